"""Shards (`recipe-dist shards`), shard URLs, and the seeded per-epoch stream."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from recipe_dist import cli
from recipe_dist.data.pipeline import (
    DataError,
    check_shards_exist,
    count_samples,
    epoch_stream,
    rank_micro_batches,
    shard_urls,
)
from recipe_dist.data.shards import ShardInputError, read_records

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny-bert.yaml"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TSV_ROWS = [(f"tsv sentence number {i} , with \"quotes\" and 'ticks' .", i % 2) for i in range(10)]
TXT_LINES = [f"plain text line {i}" for i in range(7)]
JSONL_ROWS = [{"text": f"json text {i}", "label": i % 3} for i in range(5)]


def _run_shards(capsys, inp: Path, prefix: Path, per: int) -> tuple[int, str]:
    rc = cli.main(["shards", "--input", str(inp), "--output", str(prefix), "--samples-per-shard", str(per)])
    return rc, capsys.readouterr().out


def _read_back(urls: list[str]) -> list[dict]:
    return [
        {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
        for s in wds.WebDataset(urls, shardshuffle=False)
    ]


def _tar_samples(url: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, read with tarfile only (independent of webdataset's grouping)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(url) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture
def tsv(tmp_path) -> Path:
    p = tmp_path / "in" / "train.tsv"
    p.parent.mkdir()
    p.write_text("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in TSV_ROWS))
    return p


@pytest.fixture
def txt(tmp_path) -> Path:
    p = tmp_path / "in" / "corpus.txt"
    p.parent.mkdir(exist_ok=True)
    # blank lines are skipped
    p.write_text("\n".join(TXT_LINES[:3]) + "\n\n" + "\n".join(TXT_LINES[3:]) + "\n")
    return p


@pytest.fixture
def jsonl(tmp_path) -> Path:
    p = tmp_path / "in" / "rows.jsonl"
    p.parent.mkdir(exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in JSONL_ROWS))
    return p


# ------------------------------------------------------------------ recipe-dist shards


def test_shards_from_tsv(capsys, tmp_path, tsv):
    prefix = tmp_path / "out" / "tsv"
    rc, out = _run_shards(capsys, tsv, prefix, 3)
    assert rc == 0
    files = sorted((tmp_path / "out").glob("tsv-*.tar"))
    assert [f.name for f in files] == [f"tsv-{i:06d}.tar" for i in range(4)]  # ceil(10 / 3)
    assert "4 shards" in out and f"{prefix}-{{000000..000003}}.tar" in out

    urls = shard_urls(f"{prefix}-{{000000..000003}}.tar")
    samples = _read_back(urls)
    assert len(samples) == len(TSV_ROWS)
    for s in samples:
        assert set(s) == {"__key__", "txt", "cls"}
    got = sorted((s["txt"].decode(), s["cls"].decode()) for s in samples)
    assert got == sorted((t, str(l)) for t, l in TSV_ROWS)
    assert len({s["__key__"] for s in samples}) == len(samples)

    # shard sizes: 3, 3, 3, 1
    assert [len(_tar_samples(str(f))) for f in files] == [3, 3, 3, 1]
    assert count_samples(urls) == len(TSV_ROWS)


def test_shards_from_txt(capsys, tmp_path, txt):
    prefix = tmp_path / "out" / "txt"
    rc, _ = _run_shards(capsys, txt, prefix, 4)
    assert rc == 0
    files = sorted((tmp_path / "out").glob("txt-*.tar"))
    assert len(files) == 2  # ceil(7 / 4)
    urls = shard_urls(f"{prefix}-{{000000..000001}}.tar")
    assert urls == [str(f) for f in files]
    samples = _read_back(urls)
    assert all(set(s) == {"__key__", "txt"} for s in samples)  # no label column, no cls
    assert sorted(s["txt"].decode() for s in samples) == sorted(TXT_LINES)
    assert count_samples(urls) == len(TXT_LINES)


def test_shards_from_jsonl(capsys, tmp_path, jsonl):
    prefix = tmp_path / "out" / "js"
    rc, _ = _run_shards(capsys, jsonl, prefix, 100)
    assert rc == 0
    files = sorted((tmp_path / "out").glob("js-*.tar"))
    assert [f.name for f in files] == ["js-000000.tar"]
    urls = shard_urls(str(files[0]))
    samples = _read_back(urls)
    assert sorted((s["txt"].decode(), s["cls"].decode()) for s in samples) == sorted(
        (r["text"], str(r["label"])) for r in JSONL_ROWS
    )
    raw = _tar_samples(str(files[0]))
    assert len(raw) == len(JSONL_ROWS)
    assert all(set(v) == {"txt", "cls"} for v in raw.values())
    assert count_samples(urls) == len(JSONL_ROWS)


def test_shards_input_name_with_dots(capsys, tmp_path):
    """A dotted file name (train.v2.txt) must still give one sample per line.

    webdataset splits a tar member name at its first dot into key and field, so a key built
    from such a name would merge all samples of a shard into one.
    """
    p = tmp_path / "train.v2.txt"
    p.write_text("".join(f"line {i}\n" for i in range(5)))
    prefix = tmp_path / "out" / "dotted"
    rc, _ = _run_shards(capsys, p, prefix, 10)
    assert rc == 0
    urls = shard_urls(f"{prefix}-000000.tar")
    samples = _read_back(urls)
    assert sorted(s.get("txt", b"").decode() for s in samples) == [f"line {i}" for i in range(5)]
    assert count_samples(urls) == 5


def test_shards_from_sst2_dev(capsys, tmp_path):
    dev = SHARED_DATA / "sst2" / "dev.tsv"
    if not dev.is_file():
        pytest.skip(f"{dev} not present")
    lines = dev.read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t") == ["sentence", "label"]
    rows = [ln.split("\t") for ln in lines[1:] if ln.strip()]
    prefix = tmp_path / "sst2" / "dev"
    rc, _ = _run_shards(capsys, dev, prefix, 200)
    assert rc == 0
    n_shards = -(-len(rows) // 200)
    files = sorted((tmp_path / "sst2").glob("dev-*.tar"))
    assert len(files) == n_shards
    urls = shard_urls(f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")
    assert count_samples(urls) == len(rows)
    samples = _read_back(urls)
    assert sorted((s["txt"].decode(), s["cls"].decode()) for s in samples) == sorted(
        (t.strip(), l) for t, l in rows
    )


def test_shards_unsupported_suffix_names_file(capsys, tmp_path):
    bad = tmp_path / "data.parquet"
    bad.write_bytes(b"PAR1")
    rc = cli.main(["shards", "--input", str(bad), "--output", str(tmp_path / "o" / "x")])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(bad) in err and ".parquet" in err
    assert "Traceback" not in err
    assert not list((tmp_path).glob("o/x-*.tar"))
    with pytest.raises(ShardInputError, match="data.parquet"):
        list(read_records(str(bad)))


def test_shards_missing_input_is_one_line_error(capsys, tmp_path):
    missing = tmp_path / "nope.tsv"
    try:
        rc = cli.main(["shards", "--input", str(missing), "--output", str(tmp_path / "o" / "x")])
    except FileNotFoundError as e:  # pragma: no cover - the bug this test guards against
        pytest.fail(f"missing input escaped the CLI as a traceback: {type(e).__name__}: {e}")
    err = capsys.readouterr().err
    assert rc == 2
    assert str(missing) in err


def test_shards_tsv_without_text_column(capsys, tmp_path):
    bad = tmp_path / "cols.tsv"
    bad.write_text("foo\tbar\nx\ty\n")
    rc = cli.main(["shards", "--input", str(bad), "--output", str(tmp_path / "o" / "x")])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(bad) in err and "foo" in err


# ------------------------------------------------------------------ URLs and counting


def test_shard_urls_brace_expansion():
    assert shard_urls("/d/x-{000000..000002}.tar") == ["/d/x-000000.tar", "/d/x-000001.tar", "/d/x-000002.tar"]
    assert shard_urls("s3://b/p-{08..10}.tar") == ["s3://b/p-08.tar", "s3://b/p-09.tar", "s3://b/p-10.tar"]
    assert shard_urls("/a.tar::/b-{1..2}.tar") == ["/a.tar", "/b-1.tar", "/b-2.tar"]
    assert shard_urls("/only.tar") == ["/only.tar"]


def test_count_samples_missing_shard_is_data_error(tmp_path):
    with pytest.raises(DataError, match="gone-000000.tar"):
        count_samples([str(tmp_path / "gone-000000.tar")])


def test_check_shards_exist(tmp_path, capsys, txt):
    _run_shards(capsys, txt, tmp_path / "s" / "ok", 100)
    check_shards_exist([str(tmp_path / "s" / "ok-000000.tar")])  # no error
    with pytest.raises(DataError) as ei:
        check_shards_exist(["/nonexistent/x-000000.tar"])
    assert "/nonexistent/x-000000.tar" in str(ei.value)
    with pytest.raises(DataError, match="ok-000001.tar"):
        check_shards_exist([str(tmp_path / "s" / "ok-000000.tar"), str(tmp_path / "s" / "ok-000001.tar")])


# ------------------------------------------------------------------ the seeded epoch stream

N_SAMPLES = 23  # 11 full micro-batches of 2; one sample left over (partial batches are dropped)
MICRO = 2


@pytest.fixture(scope="module")
def stream_urls(tmp_path_factory) -> list[str]:
    from recipe_dist.data.shards import write_shards

    root = tmp_path_factory.mktemp("stream")
    return write_shards(({"text": f"sample {i}"} for i in range(N_SAMPLES)), str(root / "s"), 5, key_prefix="k-")


def _identity(sample: dict) -> dict:
    return sample


def _batches(urls, seed, epoch, quota, skip=0, shuffle_buffer=8):
    def make_stream(ep):
        return epoch_stream(urls, ep, seed, "txt", _identity, MICRO, shuffle_buffer)

    return [[s["__key__"] for s in b] for b in rank_micro_batches(make_stream, epoch, quota, 0, skip=skip, seed=seed)]


def test_epoch_stream_yields_every_sample_once(stream_urls):
    assert len(stream_urls) == 5
    batches = list(epoch_stream(stream_urls, 0, 1, "txt", _identity, MICRO, 8))
    assert len(batches) == N_SAMPLES // MICRO
    assert all(len(b) == MICRO for b in batches)
    keys = [s["__key__"] for b in batches for s in b]
    assert len(set(keys)) == len(keys) == (N_SAMPLES // MICRO) * MICRO
    assert set(keys) <= {f"k-{i:09d}" for i in range(N_SAMPLES)}
    for b in batches:
        for s in b:
            assert s["text"] == f"sample {int(s['__key__'][2:])}"


def test_same_seed_and_epoch_same_order(stream_urls):
    a = _batches(stream_urls, seed=3, epoch=1, quota=11)
    b = _batches(stream_urls, seed=3, epoch=1, quota=11)
    assert len(a) == 11
    assert a == b


def test_different_epoch_different_order(stream_urls):
    e0 = _batches(stream_urls, seed=3, epoch=0, quota=11)
    e1 = _batches(stream_urls, seed=3, epoch=1, quota=11)
    assert e0 != e1
    assert _batches(stream_urls, seed=4, epoch=0, quota=11) != e0


def test_stream_is_shuffled(stream_urls):
    keys = [k for b in _batches(stream_urls, seed=0, epoch=0, quota=11) for k in b]
    assert keys != sorted(keys)


@pytest.mark.parametrize("skip", [0, 1, 4, 10, 11])
def test_skip_yields_exact_tail(stream_urls, skip):
    full = _batches(stream_urls, seed=5, epoch=2, quota=11)
    tail = _batches(stream_urls, seed=5, epoch=2, quota=11, skip=skip)
    assert tail == full[skip:]


def test_quota_larger_than_data_wraps(stream_urls):
    per_pass = N_SAMPLES // MICRO  # 11
    quota = 25
    got = _batches(stream_urls, seed=5, epoch=0, quota=quota)
    assert len(got) == quota
    one_pass = _batches(stream_urls, seed=5, epoch=0, quota=per_pass)
    assert got[:per_pass] == one_pass
    assert got[per_pass : 2 * per_pass] == one_pass
    assert got[2 * per_pass :] == one_pass[: quota - 2 * per_pass]
    # wrapping and skipping compose
    assert _batches(stream_urls, seed=5, epoch=0, quota=quota, skip=13) == got[13:]


def test_quota_smaller_than_data_stops(stream_urls):
    got = _batches(stream_urls, seed=5, epoch=0, quota=3)
    assert len(got) == 3
    assert got == _batches(stream_urls, seed=5, epoch=0, quota=11)[:3]


def test_stream_with_no_complete_batch_is_data_error(stream_urls):
    def make_stream(ep):
        return epoch_stream(stream_urls[-1:], ep, 0, "txt", _identity, 100, 8)  # 3 samples < 100

    with pytest.raises(DataError, match="no complete micro-batch"):
        list(rank_micro_batches(make_stream, 0, 2, 0))


def test_missing_text_key_is_data_error(stream_urls):
    with pytest.raises(DataError, match="no field 'text_missing'"):
        list(epoch_stream(stream_urls, 0, 0, "text_missing", _identity, MICRO, 8))


# ------------------------------------------------------------------ purify with missing shards (subprocess)


@pytest.mark.slow  # a real CLI process: CI-only, to keep the fast lane under 2 minutes
def test_purify_missing_shards_exits_2_naming_path(tmp_path):
    spec = f"{tmp_path}/missing-{{000000..000001}}.tar"
    proc = subprocess.run(
        [
            sys.executable, "-m", "recipe_dist", "purify",
            "--config", str(TINY),
            f"--data.train_urls={spec}",
            "--output_dir", str(tmp_path / "run"),
        ],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("recipe-dist: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"{tmp_path}/missing-000000.tar" in errors[0]
    assert "Traceback" not in proc.stderr


def test_ahead_keeps_order_and_raises_where_the_error_was():
    from recipe_dist.data.train_data import ahead

    assert list(ahead(iter(range(50)), 3)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise DataError("corrupt shard x.tar")

    got = []
    with pytest.raises(DataError, match="corrupt shard x.tar"):
        for item in ahead(failing(), 2):
            got.append(item)
    assert got == [1, 2]
    gen = ahead(iter(range(10**6)), 2)
    assert next(gen) == 0
    gen.close()  # the thread stops: nothing hangs


def test_shards_from_wikitext_chunks_articles_and_undoes_its_tokenization(capsys, tmp_path):
    src = tmp_path / "wiki.txt"
    body = " ".join(f"w{i}" for i in range(10))
    src.write_text(" \n = Alpha = \n \n a 1 @,@ 000 year @-@ old 3 @.@ 5 <unk> man . " + body + " \n"
                   " = = Sub = = \n more words here \n = Beta = \n " + body[:-3] + " \n", encoding="utf-8")
    out = tmp_path / "wt"
    assert cli.main(["shards", "--input", str(src), "--wikitext", "--chunk-words", "8", "--output", str(out / "s")]) == 0
    texts = [s["txt"] for s in wds.WebDataset(str(out / "s-000000.tar"), shardshuffle=False).decode()]
    # Article Alpha: 6 + 10 + 3 words (<unk> dropped, the subheading too) in 8-word chunks, never
    # spanning into Beta; Beta's 9 words end in a 1-word tail, under a quarter chunk: dropped.
    assert texts[0] == "a 1,000 year-old 3.5 man . w0 w1"
    assert all("<unk>" not in t and "@" not in t and "=" not in t for t in texts)
    assert texts[1:3] == ["w2 w3 w4 w5 w6 w7 w8 w9", "more words here"]
    assert texts[3:] == ["w0 w1 w2 w3 w4 w5 w6 w7"]
    assert cli.main(["shards", "--input", str(src), "--wikitext", "--chunk-words", "8", "--unk", "[UNK]",
                     "--output", str(tmp_path / "k" / "s")]) == 0
    kept = [s["txt"] for s in wds.WebDataset(str(tmp_path / "k" / "s-000000.tar"), shardshuffle=False).decode()]
    assert kept[0] == "a 1,000 year-old 3.5 [UNK] man . w0"


def test_chunk_words_without_wikitext_is_an_error(capsys, tmp_path, txt):
    rc = cli.main(["shards", "--input", str(txt), "--chunk-words", "8", "--output", str(tmp_path / "s")])
    assert rc != 0 and "--chunk-words needs --wikitext" in capsys.readouterr().err


def test_chunk_words_below_one_is_an_error(capsys, tmp_path):
    src = tmp_path / "wiki.txt"
    src.write_text(" = A = \n some words here \n")
    rc = cli.main(["shards", "--input", str(src), "--wikitext", "--chunk-words", "0", "--output", str(tmp_path / "s")])
    assert rc != 0 and "--chunk-words must be >= 1, got 0" in capsys.readouterr().err


# ------------------------------------------------------------------ strict input, all-or-nothing output


def _one_error(capsys, rc, *needles) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("recipe-dist: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert str(n) in lines[0], lines[0]
    return lines[0]


def _tree_digest(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shards_overwrite_with_a_bad_line_midway_changes_nothing(capsys, tmp_path):
    good = tmp_path / "good.tsv"
    good.write_text("sentence\tlabel\n" + "".join(f"sentence number {i}\t{i % 2}\n" for i in range(40)))
    out = tmp_path / "out"
    assert cli.main(["shards", "--input", str(good), "--output", str(out / "s"), "--samples-per-shard", "10"]) == 0
    capsys.readouterr()
    before = _tree_digest(out)
    bad = tmp_path / "bad.tsv"  # 35 good rows, then one with a tab inside its text
    bad.write_text("sentence\tlabel\n" + "".join(f"new sentence {i}\t{i % 2}\n" for i in range(35)) + "a\ttab inside\t1\n")
    rc = cli.main(["shards", "--input", str(bad), "--output", str(out / "s"), "--samples-per-shard", "5", "--overwrite"])
    _one_error(capsys, rc, f"{bad}:37", "3 fields where the header has 2", "tab inside the text")
    assert _tree_digest(out) == before  # the old shards and manifest, byte for byte; no staging left
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *(f"s-{i:06d}.tar" for i in range(4))])


def test_shards_refuses_a_runaway_line_and_binary_input(capsys, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("short line\n" + "word " * 300 + "\nlast\n")
    rc = cli.main(["shards", "--input", str(big), "--output", str(tmp_path / "o" / "s"), "--max-sample-bytes", "1000"])
    _one_error(capsys, rc, f"{big}:2", "over --max-sample-bytes 1000")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("*.tar"))
    binary = tmp_path / "blob.tsv"
    binary.write_bytes(b"sentence\tlabel\nok\t1\n\xff\xfe\x00\x81garbage\t0\n")
    rc = cli.main(["shards", "--input", str(binary), "--output", str(tmp_path / "o2" / "s")])
    _one_error(capsys, rc, str(binary), "not UTF-8")


def test_task_files_are_parsed_strictly(tmp_path):
    from recipe_dist.evaluation.finetune import EvalDataError, read_labelled

    short = tmp_path / "short.tsv"
    short.write_text("sentence\tlabel\ngood\t1\nno label here\n")
    with pytest.raises(EvalDataError, match=r"short.tsv:3: 1 fields where the header has 2"):
        read_labelled(str(short), "sentence", "label", "task.train_file")
    odd = tmp_path / "odd.tsv"
    odd.write_text("sentence\tlabel\na\t0\nb\t1\nc\t1.0\n")
    with pytest.raises(EvalDataError, match=r"odd.tsv:4: label '1.0' is not an integer like the others"):
        read_labelled(str(odd), "sentence", "label", "task.train_file")
