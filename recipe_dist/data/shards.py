"""`recipe-dist shards`: text files (TSV, TXT, JSONL) to WebDataset tar shards.

Each sample is `{"__key__", "txt"}` plus `"cls"` when the input has a label column. PREFIX may be
a local path or an object-store URL (s3://bucket/prefix/name, gs://, az://): a remote shard is
written to a local temporary file first and uploaded once complete (retried on transient
errors), so a reader never sees half a shard. An S3-compatible store is reached through
AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), with credentials from the environment or a profile.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import fsspec
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem

from ..errors import RecipeError
from . import storage

TEXT_COLUMNS = ("text", "sentence", "txt", "content")
LABEL_COLUMNS = ("label", "cls", "labels")


class ShardInputError(RecipeError, ValueError):
    pass


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: str, required: bool):
    if wanted:
        if wanted not in columns:
            raise ShardInputError(f"{path}: no {what} column '{wanted}' (columns: {', '.join(columns)})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    if required:
        raise ShardInputError(f"{path}: no {what} column; expected one of {', '.join(candidates)} (columns: {', '.join(columns)})")
    return None


def read_records(path: str, text_column: str | None = None, label_column: str | None = None) -> Iterator[dict]:
    """Yield {'text', optional 'label'} from a .tsv (with header), .jsonl or .txt (one per line)."""
    suffix = Path(path.split("?")[0]).suffix.lower()
    fs, fpath = storage.filesystem(path)
    try:
        handle = storage.call(lambda: fs.open(fpath, "rt", encoding="utf-8"), path, what="input file")
    except storage.DataError as e:
        raise ShardInputError(str(e)) from None
    with handle as f:
        try:
            yield from _records(f, path, suffix, text_column, label_column)
        except UnicodeDecodeError as e:
            # Binary data or another encoding: name the file and where, never a codec traceback.
            raise ShardInputError(f"{path}: not UTF-8 text (byte {e.start} of a read block: {e.reason}); "
                                  "convert it to UTF-8 (e.g. iconv -t utf-8)") from None
        except csv.Error as e:
            raise ShardInputError(f"{path}: unreadable {suffix} ({e})") from None


def _records(f, path: str, suffix: str, text_column: str | None, label_column: str | None) -> Iterator[dict]:
    if suffix in (".tsv", ".csv"):
        delim = "\t" if suffix == ".tsv" else ","
        reader = csv.DictReader(f, delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL)
        cols = reader.fieldnames or []
        tcol = _pick(cols, text_column, TEXT_COLUMNS, "text", path, True)
        lcol = _pick(cols, label_column, LABEL_COLUMNS, "label", path, False)
        for row in reader:
            # A row whose field count differs from the header's (a tab inside the text, a
            # missing label) would shift or drop a column silently: it is an error, by line.
            extra, missing = row.get(None), [k for k, v in row.items() if k is not None and v is None]
            if extra or missing:
                n = len(cols) + len(extra or []) - len(missing)
                raise ShardInputError(f"{path}:{reader.line_num}: {n} fields where the header has {len(cols)}"
                                      f"{' (a tab inside the text?)' if extra and delim == chr(9) else ''}")
            text = (row.get(tcol) or "").strip()
            if text:
                yield {"text": text, "line": reader.line_num, **({"label": row[lcol]} if lcol else {})}
    elif suffix in (".jsonl", ".json"):
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise ShardInputError(f"{path}:{lineno}: invalid JSON line") from None
            tcol = _pick(list(obj), text_column, TEXT_COLUMNS, "text", f"{path}:{lineno}", True)
            lcol = _pick(list(obj), label_column, LABEL_COLUMNS, "label", path, False)
            yield {"text": str(obj[tcol]).strip(), "line": lineno, **({"label": obj[lcol]} if lcol else {})}
    elif suffix in (".txt", ""):
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield {"text": line.strip(), "line": lineno}
    else:
        raise ShardInputError(f"{path}: unsupported input type '{suffix}' (use .tsv, .csv, .jsonl or .txt)")


# WikiText's tokenized release splits a hyphen, comma or decimal point inside a word or number
# as " @-@ ", " @,@ ", " @.@ "; a heading line is "= Title =" (deeper levels "= = Sub = =").
WIKITEXT_JOINS = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}
WIKITEXT_HEADING = re.compile(r"(= )+.*( =)+")


def wikitext_records(path: str, chunk_words: int, unk: str = "drop") -> Iterator[dict]:
    """Running text of a WikiText file in `chunk_words`-word chunks, as the POR reference reads
    WikiText (64-word chunks). Headings are dropped (a top-level heading starts a new article, and
    a chunk never spans two articles); the @-joins are undone; `<unk>` (a word the release
    replaced, ~6% of words) is dropped (`unk="drop"`) or kept as the tokenizer's unknown token
    (`unk="[UNK]"`), never left as the literal `<unk>` that WordPiece would split into four
    pieces. An article's tail shorter than a quarter chunk is dropped."""
    if chunk_words < 1:
        raise ShardInputError(f"--chunk-words must be >= 1, got {chunk_words}")
    if unk not in ("drop", "[UNK]"):
        raise ShardInputError(f"--unk must be drop or [UNK], got {unk!r}")
    fs, fpath = storage.filesystem(path)
    try:
        handle = storage.call(lambda: fs.open(fpath, "rt", encoding="utf-8"), path, what="input file")
    except storage.DataError as e:
        raise ShardInputError(str(e)) from None

    def chunks(words: list[str]) -> Iterator[dict]:
        for i in range(0, len(words), chunk_words):
            piece = words[i : i + chunk_words]
            if len(piece) * 4 >= chunk_words:
                yield {"text": " ".join(piece)}

    words: list[str] = []
    with handle as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if WIKITEXT_HEADING.fullmatch(line):
                if not line.startswith("= ="):  # a new article
                    yield from chunks(words)
                    words = []
                continue
            for marker, joined in WIKITEXT_JOINS.items():
                line = line.replace(marker, joined)
            for w in line.split():
                if w != "<unk>":
                    words.append(w)
                elif unk != "drop":
                    words.append(unk)
    yield from chunks(words)


FIELD_EXTENSIONS = {"text": "txt", "label": "cls"}


IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def _image_bytes(path: Path) -> tuple[str, bytes]:
    """(shard field, bytes) of an image file, checked to decode: a bad file is refused by name."""
    from ..models.vision import open_image

    ext = IMAGE_SUFFIXES.get(path.suffix.lower())
    if ext is None:
        raise ShardInputError(f"{path}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
    raw = path.read_bytes()
    try:
        open_image(raw, str(path))
    except storage.DataError as e:
        raise ShardInputError(str(e)) from None
    return ext, raw


def image_folder_records(root: str) -> Iterator[dict]:
    """{jpg|png: bytes, label: class index} from ROOT/<class>/<image>; classes are the sorted subfolder names."""
    base = Path(root)
    if not base.is_dir():
        raise ShardInputError(f"--image-folder: not a directory: {root}")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise ShardInputError(f"--image-folder: {root} has no class subfolders")
    print("classes: " + ", ".join(f"{i}={c}" for i, c in enumerate(classes)), file=sys.stderr)
    for i, c in enumerate(classes):
        for f in sorted(p for p in (base / c).iterdir() if p.is_file()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            ext, raw = _image_bytes(f)
            yield {ext: raw, "label": i}


def caption_records(csv_path: str, image_column: str = "filepath", caption_column: str = "title") -> Iterator[dict]:
    """{jpg|png: bytes, txt: caption} from a CSV of image paths (relative to the CSV) and captions."""
    path = Path(csv_path)
    if not path.is_file():
        raise ShardInputError(f"--captions: file not found: {csv_path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        cols = reader.fieldnames or []
        for col in (image_column, caption_column):
            _pick(cols, col, (), "image" if col == image_column else "caption", str(path), True)
        for line, row in enumerate(reader, 2):
            image, caption = (row.get(image_column) or "").strip(), (row.get(caption_column) or "").strip()
            if not image or not caption:
                raise ShardInputError(f"{path}:{line}: empty {image_column if not image else caption_column}")
            f_img = Path(image) if Path(image).is_absolute() else path.parent / image
            if not f_img.is_file():
                raise ShardInputError(f"{path}:{line}: image not found: {f_img}")
            ext, raw = _image_bytes(f_img)
            yield {ext: raw, "txt": caption}


def write_shards(records, output_prefix: str, samples_per_shard: int, key_prefix: str = "s", manifest: bool = True,
                 max_sample_bytes: int = 0, source: str = "input") -> list[str]:
    """Write records into `{output_prefix}-{000000..}.tar` and, with `manifest`, their manifest.json
    beside them (data/manifest.py); returns the shard URLs.

    All or nothing: the shards are written under a staging directory beside the output and moved
    into place only after the last record was read, then shards of an earlier, longer set under the
    same prefix are removed and the manifest is written. A bad record midway (a malformed line, a
    sample over `max_sample_bytes`) leaves the output exactly as it was."""
    if samples_per_shard < 1:
        raise ShardInputError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    final_prefix = output_prefix
    fs_out, out_path = fsspec.core.url_to_fs(final_prefix)
    parent, name = out_path.rsplit("/", 1) if "/" in out_path else (".", out_path)
    staging_dir = f"{parent}/.{name}.staging-{os.getpid()}-{time.monotonic_ns()}"
    output_prefix = final_prefix[: len(final_prefix) - len(out_path)] + f"{staging_dir}/{name}" if storage.is_remote(final_prefix) \
        else f"{staging_dir}/{name}"
    try:
        staged = _write_staged(records, output_prefix, samples_per_shard, key_prefix, max_sample_bytes, source)
        old = existing_shards(final_prefix)
        urls, infos = [], []
        for url, info in staged:
            target = f"{final_prefix}-{url.rsplit('-', 1)[1]}"
            fs_out.mv(fsspec.core.url_to_fs(url)[1], fsspec.core.url_to_fs(target)[1])
            urls.append(target)
            infos.append(dataclasses.replace(info, url=target))
        written = {fsspec.core.url_to_fs(u)[1] for u in urls}
        for p in old:
            if p not in written:
                fs_out.rm(p)  # a longer earlier set's tail would otherwise match the prefix
    finally:
        try:
            fs_out.rm(staging_dir, recursive=True)
        except (FileNotFoundError, OSError):
            pass
    if manifest:
        from . import manifest as manifests

        manifests.write(infos)
    return urls


def _write_staged(records, output_prefix: str, samples_per_shard: int, key_prefix: str, max_sample_bytes: int,
                  source: str) -> list[tuple[str, object]]:
    """The shards of `records` under `output_prefix` (the staging directory): [(url, ShardInfo)]."""
    # webdataset splits member names at the first dot: a dot in the key would merge samples.
    key_prefix = key_prefix.replace(".", "_")
    remote = storage.is_remote(output_prefix)
    urls: list[str] = []
    writer = handle = None
    n = 0
    infos: list = []  # the manifest entries, taken from each finished file before it is uploaded
    first_of_shard = 0

    def finish() -> None:
        from .manifest import ShardInfo

        writer.close()
        handle.close()
        local = handle.name if remote else fsspec.core.url_to_fs(urls[-1])[1]
        digest, size = hashlib.sha256(), 0
        with open(local, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
        infos.append(ShardInfo(urls[-1], n - first_of_shard, size, digest.hexdigest()))
        if remote:
            try:
                storage.upload(handle.name, urls[-1])
            finally:
                os.unlink(handle.name)

    try:
        for i, rec in enumerate(records):
            if i % samples_per_shard == 0:
                if writer is not None:
                    finish()
                    writer = None
                first_of_shard = n
                url = f"{output_prefix}-{len(urls):06d}.tar"
                if remote:
                    handle = tempfile.NamedTemporaryFile(suffix=".tar", delete=False)
                else:
                    fs, path = fsspec.core.url_to_fs(url)
                    if isinstance(fs, LocalFileSystem):
                        fs.makedirs(fs._parent(path), exist_ok=True)
                    handle = fsspec.open(url, "wb").open()
                writer = wds.TarWriter(handle)
                urls.append(url)
            # Records name their fields as a reader does (text, label) or by the shard's own
            # extensions (jpg, cls, ...); webdataset picks the encoding from the extension.
            sample = {"__key__": f"{key_prefix}{i:09d}"}
            for field, value in rec.items():
                if field == "line":
                    continue  # where the record came from, for error messages: not a shard field
                if max_sample_bytes and isinstance(value, str) and len(value) > max_sample_bytes // 4 and \
                        len(value.encode()) > max_sample_bytes:
                    where = f"{source}:{rec['line']}" if "line" in rec else f"{source}: sample {i + 1}"
                    raise ShardInputError(f"{where}: a {field} of {len(value.encode())} bytes is over --max-sample-bytes "
                                          f"{max_sample_bytes}; split the line or raise the bound")
                sample[FIELD_EXTENSIONS.get(field, field)] = str(value) if field == "label" else value
            writer.write(sample)
            n += 1
        if writer is not None:
            finish()
            writer = None
    finally:
        if writer is not None:  # an error midway: drop the unfinished shard's temporary file
            writer.close()
            handle.close()
            if remote:
                os.unlink(handle.name)
    if n == 0:
        raise ShardInputError("input has no samples")
    return list(zip(urls, infos))


def brace_pattern(urls: list[str], prefix: str) -> str:
    return f"{prefix}-{{000000..{len(urls) - 1:06d}}}.tar" if len(urls) > 1 else urls[0]


def existing_shards(output_prefix: str) -> list[str]:
    """Shards already present under `output_prefix` (PREFIX-NNNNNN.tar), local or remote."""
    fs, path = fsspec.core.url_to_fs(output_prefix)
    try:
        return sorted(fs.glob(path + "-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    except (FileNotFoundError, OSError):
        return []


def manifest_only(spec: str) -> int:
    """`recipe-dist shards --manifest-only URLS`: a manifest for shards that already exist."""
    from . import manifest
    from .pipeline import shard_urls

    urls = shard_urls(spec)
    infos = []
    for i, url in enumerate(urls, 1):
        infos.append(manifest.scan_shard(url))
        if i % 100 == 0 or i == len(urls):
            print(f"scanned {i}/{len(urls)} shards", file=sys.stderr, flush=True)
    for target in manifest.write(infos):
        print(f"wrote {target} ({sum(x.samples for x in infos)} samples in {len(infos)} shards)")
    return 0


def main(args) -> int:
    if args.manifest_only:
        return manifest_only(args.manifest_only)
    source = args.input or getattr(args, "image_folder", None) or getattr(args, "captions", None)
    if not source or not args.output:
        raise ShardInputError("--output and one of --input, --image-folder, --captions are required "
                              "(or --manifest-only URLS for shards that exist)")
    old = existing_shards(args.output)
    if old and not args.overwrite:
        raise ShardInputError(f"--output: {len(old)} shard(s) already exist under {args.output} (first: {old[0]}); "
                              "choose another prefix or pass --overwrite to replace them")
    if getattr(args, "image_folder", None):
        recs = image_folder_records(args.image_folder)
    elif getattr(args, "captions", None):
        recs = caption_records(args.captions, args.image_column, args.caption_column)
    elif getattr(args, "wikitext", False) or getattr(args, "chunk_words", None) is not None:
        if not getattr(args, "wikitext", False):
            raise ShardInputError("--chunk-words needs --wikitext (chunks of running text)")
        recs = wikitext_records(args.input, 64 if args.chunk_words is None else args.chunk_words, args.unk)
    else:
        recs = read_records(args.input, args.text_column, args.label_column)
    if getattr(args, "max_sample_bytes", 1) < 1:
        raise ShardInputError(f"--max-sample-bytes must be >= 1, got {args.max_sample_bytes}")
    # All or nothing (write_shards): a bad line midway leaves the old shards and manifest as they were.
    urls = write_shards(recs, args.output, args.samples_per_shard, key_prefix=Path(source.rstrip("/")).stem + "-",
                        max_sample_bytes=getattr(args, "max_sample_bytes", 0), source=source)
    print(f"wrote {len(urls)} shards: {brace_pattern(urls, args.output)}", file=sys.stdout)
    return 0
