"""Shard storage: s3://, gs://, az://, file:// URLs and plain paths, opened through fsspec.

- webdataset's `gopen` has no s3 scheme (and runs `gsutil` for gs://): the object-store schemes
  are registered in its dispatch table (`gopen_schemes`) on import, so every `wds` pipeline in
  the process opens them here.
- The state (options, filesystem clients, counters) lives in a `Storage` object. Each process
  has one default instance, which the module-level functions use: DataLoader workers are other
  processes, so each configures and counts on its own, and hands its counts to the main process
  with its batches (pipeline.rank_micro_batches).
- One filesystem client per protocol, made lazily on first use. DataLoader workers are forked
  from a parent that may already hold one; a client (and its event loop and connection pool)
  must not cross a fork, so the cache is keyed on the process id and fsspec's own instance
  cache is skipped.
- Credentials come only from the standard places (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
  AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws, instance roles; GOOGLE_APPLICATION_CREDENTIALS;
  AZURE_STORAGE_*). The config holds an endpoint, never a key, so nothing secret reaches
  config.yaml, checkpoints or logs; error messages are scrubbed of secret values as well.
- An S3-compatible store is reached with `data.endpoint_url`, or botocore's own
  AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3.
- Transient errors (HTTP 5xx, 408, 429, throttling, connection resets, timeouts, short reads)
  are retried here with exponential backoff and counted; the SDK's own retries are switched
  off so that every retry is counted once. Objects are read by byte ranges: a retried range
  resumes at the same byte, so a dropped connection loses or repeats nothing.
- Missing objects and refused credentials are not retried: they fail at once, naming the URL.
"""

from __future__ import annotations

import collections
import errno
import functools
import importlib
import io
import logging
import os
import random
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import fsspec

from ..errors import RecipeError

# The module: `webdataset.gopen` as an attribute is the function of that name, which shadows it.
wds_gopen = importlib.import_module("webdataset.gopen")

log = logging.getLogger("recipe_dist.data")

REMOTE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
BLOCK_SIZE = 8 << 20  # bytes per ranged GET: one request per small shard, few per large one
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET",
)

T = TypeVar("T")


class DataError(RecipeError, RuntimeError):
    """Bad or missing data; the message names the URL."""


@dataclass(frozen=True)
class StorageOptions:
    """How shards are reached; built from `data.*` (no credentials: those come from the environment)."""

    endpoint_url: str = ""
    retries: int = 5
    retry_backoff: float = 0.5
    io_timeout: float = 60.0

    @classmethod
    def from_config(cls, data: Any) -> "StorageOptions":
        return cls(data.endpoint_url, data.retries, data.retry_backoff, data.io_timeout)


def warn(message: str) -> None:
    """One line on stderr; from a DataLoader worker too (its stderr is the rank's)."""
    print(f"recipe-dist: warning: {redact(message)}", file=sys.stderr, flush=True)


def is_remote(url: str) -> bool:
    return url.split("://", 1)[0].lower() in REMOTE_SCHEMES if "://" in url else False


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


# ------------------------------------------------------------------ errors


def redact(text: str) -> str:
    """`text` on one line, with the values of secret environment variables masked."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return " ".join(str(text).split())


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _client_error(exc: BaseException):
    """The botocore ClientError behind `exc` (s3fs translates them to OSErrors), if any."""
    for e in _chain(exc):
        if hasattr(e, "response") and isinstance(getattr(e, "response"), dict) and "Error" in e.response:
            return e
    return None


class ShortRead(IOError):
    """A ranged read returned fewer bytes than asked for: the connection ended early."""


@functools.cache
def _transient_types() -> tuple[type, ...]:
    # Imported on first use, not at import: botocore alone takes a noticeable share of start-up.
    # All three come with s3fs, a hard dependency.
    import http.client

    import aiohttp
    import botocore.exceptions as bx
    from fsspec.exceptions import FSTimeoutError

    return (
        ConnectionError, TimeoutError, ShortRead, http.client.IncompleteRead,
        bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError,
        aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
        FSTimeoutError,
    )


THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                  "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests"}


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: 5xx / 408 / 429 / throttling, connection resets, timeouts, short reads."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, DataError)):
        return False
    ce = _client_error(exc)
    if ce is not None:
        status = ce.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status in (408, 429) or ce.response["Error"].get("Code") in THROTTLE_CODES
    transient = _transient_types()
    for e in _chain(exc):
        if isinstance(e, transient):
            return True
        status = getattr(e, "status", None) or getattr(e, "status_code", None)  # gcsfs, adlfs
        if isinstance(status, int) and (status >= 500 or status in (408, 429)):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE):
            return True
    return False


def describe(exc: BaseException) -> str:
    """A short, secret-free reason for `exc`."""
    ce = _client_error(exc)
    if ce is not None:
        err = ce.response["Error"]
        status = ce.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = err.get("Code", "?")
        # A HEAD error has no body: botocore then uses the status as the code.
        text = f"HTTP {status} {err.get('Message', '')}" if code == str(status) else f"{code} (HTTP {status}): {err.get('Message', '')}"
        text = text.rstrip(": ")
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return redact(text)[:400]


def storage_error(url: str, exc: BaseException, action: str = "read", what: str = "shard") -> DataError:
    """The one-line DataError for a failed storage call on `url` (a `what`: shard, input file)."""
    if isinstance(exc, DataError):
        return exc
    reason = describe(exc)
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{what} not found: {url}" + (f" ({reason})" if _client_error(exc) is not None else ""))
    if isinstance(exc, PermissionError) or type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return DataError(
            f"cannot {action} {url}: access denied ({reason}); check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's permissions"
        )
    return DataError(f"cannot {action} {url}: {reason}")


# ------------------------------------------------------------------ clients


def _make_client(protocol: str, opts: StorageOptions):
    if protocol == "s3":
        import s3fs

        fs = s3fs.S3FileSystem(
            skip_instance_cache=True,
            endpoint_url=opts.endpoint_url or None,  # None: botocore reads AWS_ENDPOINT_URL(_S3), profiles
            config_kwargs={
                # Retries are ours (counted, ranged): no hidden SDK retries underneath.
                "retries": {"total_max_attempts": 1},
                "connect_timeout": opts.io_timeout,
                "read_timeout": opts.io_timeout,
            },
        )
        fs.retries = 1  # s3fs's own retry loop, likewise
        return fs
    return fsspec.filesystem(protocol, skip_instance_cache=True)


# ------------------------------------------------------------------ reading


class RangeReader(io.RawIOBase):
    """Reads one object by byte ranges, each ranged GET retried on its own (by `retry`, a `Storage.call`).

    The object's size is taken once at open; a range that comes back short is a transient
    error (the connection dropped), never an end of file, so no byte is lost or read twice.
    """

    def __init__(self, fs: Any, path: str, url: str, size: int, retry: Callable[..., Any], block_size: int = BLOCK_SIZE):
        super().__init__()
        self.fs, self.path, self.url, self.size = fs, path, url, size
        self.retry = retry
        self.block_size = block_size
        self.pos = 0
        self._block = b""
        self._block_start = 0

    def readable(self) -> bool:
        return True

    def _fetch(self, start: int, end: int) -> bytes:
        data = self.fs.cat_file(self.path, start=start, end=end)
        if len(data) != end - start:
            raise ShortRead(f"got {len(data)} of {end - start} bytes at offset {start}")
        return data

    def readinto(self, buf) -> int:
        if self.pos >= self.size:
            return 0
        offset = self.pos - self._block_start
        if not (0 <= offset < len(self._block)):
            start, end = self.pos, min(self.pos + self.block_size, self.size)
            self._block = self.retry(lambda: self._fetch(start, end), self.url)
            self._block_start, offset = start, 0
        n = min(len(buf), len(self._block) - offset)
        buf[:n] = self._block[offset : offset + n]
        self.pos += n
        return n

    def __repr__(self) -> str:
        return f"<RangeReader {self.url}>"


def stream_size(stream: Any) -> int | None:
    """Bytes in the object behind an opened stream, when known."""
    raw = getattr(stream, "raw", stream)
    if isinstance(raw, RangeReader):
        return raw.size
    if isinstance(raw, io.BytesIO):  # a prefetched whole object
        return raw.getbuffer().nbytes
    try:
        return os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


# ------------------------------------------------------------------ the storage object

# Every Storage of this process, weakly: a fork resets the counts of each (`_after_fork_in_child`).
_live: weakref.WeakSet[Storage] = weakref.WeakSet()


class Storage:
    """Shard storage for one process: its options, one filesystem client per protocol, and its
    counters (`retries`, `corrupt_skipped`).

    `default()` is the process's instance, the one the module-level functions and webdataset's
    `gopen` use. A DataLoader worker is another process with its own default instance: it
    configures that one and hands its counts over with its batches.
    """

    def __init__(self, options: StorageOptions | None = None):
        self.options = options or StorageOptions()
        self._clients: dict[tuple, Any] = {}
        self._counts: collections.Counter = collections.Counter()
        # Backoff jitter from a private generator: the global `random` state belongs to the run.
        self._jitter = random.Random()
        _live.add(self)

    def configure(self, options: StorageOptions) -> None:
        """Set the options (the main process, and each DataLoader worker)."""
        self.options = options

    # -------------------------------------------------------------- counters

    def count(self, name: str, n: int = 1) -> None:
        self._counts[name] += n

    def counts(self) -> dict[str, int]:
        """Totals so far: `retries`, `corrupt_skipped`."""
        return {"retries": self._counts["retries"], "corrupt_skipped": self._counts["corrupt_skipped"]}

    def take_counts(self) -> dict[str, int]:
        """The counts since the last call, and reset them (a worker's side of the hand-over)."""
        out = {k: v for k, v in self._counts.items() if v}
        self._counts.clear()
        return out

    def add_counts(self, delta: dict[str, int]) -> None:
        """Add counts handed over by a DataLoader worker (the main process's side)."""
        for k, v in delta.items():
            self._counts[k] += int(v)

    # -------------------------------------------------------------- clients and retries

    def filesystem(self, url: str) -> tuple[Any, str]:
        """(filesystem, path) for `url`, from this process's client for its protocol (made on first use)."""
        protocol, _ = fsspec.core.split_protocol(url)
        protocol = (protocol or "file").lower()
        # The pid: a forked DataLoader worker must make its own client, not reuse its parent's.
        key = (os.getpid(), protocol, self.options)
        fs = self._clients.get(key)
        if fs is None:
            try:
                fs = self._clients[key] = _make_client(protocol, self.options)
            except (ImportError, ValueError) as e:  # e.g. gcsfs / adlfs not installed
                raise DataError(f"cannot open {url}: {redact(str(e))}") from None
        return fs, fs._strip_protocol(url)

    def call(self, fn: Callable[[], T], url: str, action: str = "read", what: str = "shard") -> T:
        """`fn()`, retried on transient storage errors with exponential backoff (each retry counted).

        Anything else, or a transient error that outlasts `retries`, becomes a one-line DataError
        naming `url`.
        """
        opts = self.options
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified right here
                if not is_transient(exc) or attempt >= opts.retries:
                    err = storage_error(url, exc, action, what)
                    if is_transient(exc):
                        err = DataError(f"{err} (gave up after {attempt} retries)")
                    raise err from None
                attempt += 1
                self._counts["retries"] += 1
                delay = min(opts.retry_backoff * 2 ** (attempt - 1), 10.0) * (0.5 + self._jitter.random())
                log.info("retry %d/%d of %s on %s in %.2fs: %s", attempt, opts.retries, action, url, delay, describe(exc))
                time.sleep(delay)

    # -------------------------------------------------------------- reading, listing, writing

    def open_url(self, url: str, block_size: int = BLOCK_SIZE) -> io.BufferedReader:
        """A buffered binary stream over `url` (remote: ranged and retried; local: a plain file)."""
        if not is_remote(url):
            try:
                return open(_local_path(url), "rb")
            except OSError as e:
                raise storage_error(url, e) from None
        fs, path = self.filesystem(url)
        info = self.call(lambda: fs.info(path), url)
        if info.get("type") == "directory":
            raise DataError(f"{url} is a prefix, not a shard; end it with '/' to list the shards under it")
        raw = RangeReader(fs, path, url, int(info["size"]), self.call, block_size)
        return io.BufferedReader(raw, buffer_size=min(block_size, 1 << 20))

    def exists(self, url: str) -> None:
        """Raise a one-line DataError unless `url` is a readable object."""
        if not is_remote(url):
            if not os.path.isfile(_local_path(url)):
                raise DataError(f"shard not found: {url}")
            return
        fs, path = self.filesystem(url)
        self.call(lambda: fs.info(path), url)

    def list_shards(self, url: str) -> list[str]:
        """Sorted shard URLs under a prefix (`.../` lists `*.tar*` objects below it) or matching a glob."""
        protocol, _ = fsspec.core.split_protocol(url)
        fs, path = self.filesystem(url)
        if url.endswith("/"):
            found = [p for p in self.call(lambda: fs.find(path), url, "list") if p.endswith(TAR_SUFFIXES)]
        else:
            matches = self.call(lambda: fs.glob(path, detail=True), url, "list")
            found = [p for p, info in matches.items() if info.get("type") != "directory"]
        if not protocol:
            return sorted(found)
        return sorted(f"{protocol}://{p.split('://', 1)[-1]}" for p in found)

    def upload(self, local_path: str, url: str) -> None:
        """Copy a finished local file to `url` (retried whole: a PUT is idempotent)."""
        fs, path = self.filesystem(url)
        self.call(lambda: fs.put_file(local_path, path), url, "write", what="destination")


def _after_fork_in_child() -> None:
    # A forked DataLoader worker starts from zero: its parent's counts are the parent's to report.
    for s in list(_live):
        s._counts.clear()


if hasattr(os, "register_at_fork"):  # POSIX only; elsewhere workers are spawned, not forked
    os.register_at_fork(after_in_child=_after_fork_in_child)

_default = Storage()


def default() -> Storage:
    """This process's storage: the instance the module-level functions below delegate to."""
    return _default


# ------------------------------------------------------------------ module-level delegates
# The process-default instance's methods under their historical names, for callers that do not
# hold a Storage (the pipeline stages run inside DataLoader workers, and webdataset's gopen).


def configure(options: StorageOptions) -> None:
    _default.configure(options)


def count(name: str, n: int = 1) -> None:
    _default.count(name, n)


def counts() -> dict[str, int]:
    return _default.counts()


def take_counts() -> dict[str, int]:
    return _default.take_counts()


def add_counts(delta: dict[str, int]) -> None:
    _default.add_counts(delta)


def filesystem(url: str) -> tuple[Any, str]:
    return _default.filesystem(url)


def call(fn: Callable[[], T], url: str, action: str = "read", what: str = "shard") -> T:
    return _default.call(fn, url, action, what)


def open_url(url: str, block_size: int = BLOCK_SIZE) -> io.BufferedReader:
    return _default.open_url(url, block_size)


def exists(url: str) -> None:
    _default.exists(url)


def list_shards(url: str) -> list[str]:
    return _default.list_shards(url)


def upload(local_path: str, url: str) -> None:
    _default.upload(local_path, url)


# ------------------------------------------------------------------ webdataset


def _gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    if mode != "rb":
        fs, path = filesystem(url)
        return fs.open(path, mode)
    return open_url(url)


def register_gopen() -> None:
    """Route webdataset's gopen for the object-store schemes through `open_url` (process-wide:
    webdataset's dispatch table is a module global, so it reaches the default instance)."""
    for scheme in REMOTE_SCHEMES:
        wds_gopen.gopen_schemes[scheme] = _gopen


register_gopen()
