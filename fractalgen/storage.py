"""Local-or-S3 storage helpers shared by data preparation, the loader, checkpoints and the registry.

Terms:
- *URI*: either a local path (``/data/in64``, ``runs/x``, ``file:///data``) or an S3 URI
  (``s3://bucket/prefix``). Helpers take and return URIs as plain strings; ``join`` keeps the scheme.
- *endpoint*: the URL of an S3-compatible store (MinIO, Ceph, moto). Resolved by ``endpoint_url``:
  the explicit argument, else ``S3_ENDPOINT_URL`` (the variable mosaicml-streaming reads), else
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; ``None`` means AWS itself.

Credentials come from boto3's standard chain (environment, shared files, instance roles): nothing
here reads or stores them. pyarrow gets the endpoint passed explicitly (``pyarrow_filesystem``)
because some pyarrow versions ignore the ``AWS_ENDPOINT_URL*`` variables.

Local writes are atomic (temporary file + ``os.replace``), so a reader sees either the old or the new
file, never half of one. Object stores give the same guarantee per object.

Retries (one setting for every S3 client here, ``s3_max_attempts``): each S3 request is attempted up
to ``AWS_MAX_ATTEMPTS`` times (the standard AWS variable; default ``DEFAULT_S3_MAX_ATTEMPTS``) with
jittered exponential backoff, on 5xx answers, throttling (``SlowDown``) and dropped or refused
connections. boto3 clients (``s3_client``) use botocore's ``standard`` mode; pyarrow's
``S3FileSystem`` (Ray Train's checkpoints, ``pyarrow_filesystem``) its standard strategy with the same
count; mosaicml-streaming's own boto3 client reads ``AWS_MAX_ATTEMPTS`` from the environment, which
``export_streaming_endpoint`` sets when it is unset. What still fails after the retries raises
``StorageError`` naming the URI being read or written, the S3 error and the endpoint.

This is the one S3 layer: nothing else builds a boto3 client or an ``S3FileSystem`` or resolves an
endpoint. Which client serves what (ours, pyarrow's for Ray's run storage, mosaicml-streaming's for
shard downloads) and how each gets the endpoint: docs/storage.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

ENDPOINT_ENV_VARS: tuple[str, ...] = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

MAX_ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"  # read by botocore itself too (mosaicml-streaming's client)
# botocore's standard mode waits rand(0, 1) x 50 ms x 2^i between attempts (1 s x 2^i after throttling),
# at most 20 s: 10 attempts ride out about 13 s of errors on average (about 50 s of throttling);
# pyarrow's standard strategy waits rand(0, 1) x 1 s x 2^i, at most 20 s.
DEFAULT_S3_MAX_ATTEMPTS = 10
S3_CONNECT_TIMEOUT_S = 10.0
S3_READ_TIMEOUT_S = 60.0

_clients: dict[tuple[int, str | None, int], Any] = {}
_clients_lock = threading.Lock()


class StorageError(OSError):
    """An S3 request still failed after its retries; the message names the URI and the endpoint."""


def s3_max_attempts() -> int:
    """Attempts per S3 request (first try included): ``AWS_MAX_ATTEMPTS``, else the default."""
    raw = os.environ.get(MAX_ATTEMPTS_ENV, "").strip()
    if not raw:
        return DEFAULT_S3_MAX_ATTEMPTS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{MAX_ATTEMPTS_ENV}={raw!r}: expected a whole number of attempts (>= 1)") from None
    if value < 1:
        raise ValueError(f"{MAX_ATTEMPTS_ENV}={raw!r}: expected a whole number of attempts (>= 1)")
    return value


def botocore_config(**extra: Any) -> Any:
    """The ``botocore.config.Config`` of every boto3 client here (retries, timeouts, ``extra``)."""
    from botocore.config import Config  # deferred: heavy import

    return Config(
        retries={"mode": "standard", "total_max_attempts": s3_max_attempts()},
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_READ_TIMEOUT_S,
        **extra,
    )


def _is_s3_library_error(err: BaseException) -> bool:
    """An error raised by boto3 / botocore / s3transfer (the S3 client), not by our own code."""
    return type(err).__module__.split(".", 1)[0] in ("botocore", "boto3", "s3transfer")


def s3_error_reason(err: BaseException) -> str:
    """What an S3 client error says, on one line: the S3 error code and message, the attempts made."""
    response = getattr(err, "response", None) or {}
    retries = response.get("ResponseMetadata", {}).get("RetryAttempts")
    tries = f" after {int(retries) + 1} attempts" if isinstance(retries, int) and retries > 0 else ""
    error = response.get("Error", {})
    if error.get("Code"):
        code = str(error["Code"])
        code = f"HTTP {code}" if code.isdigit() else code
        message = error.get("Message") or ""
        return f"{code}{f' ({message})' if message else ''}{tries}"
    return f"{type(err).__name__}: {str(err).strip()}{tries}"


@contextlib.contextmanager
def _s3_errors(action: str, uri: str, endpoint: str | None) -> Iterator[None]:
    """Turn an S3 client error that survived the retries into a ``StorageError`` naming ``uri``."""
    try:
        yield
    except (StorageError, FileNotFoundError):
        raise
    except Exception as err:
        if not _is_s3_library_error(err):
            raise
        where = endpoint_url(endpoint) or "AWS"
        raise StorageError(
            f"cannot {action} {uri}: {s3_error_reason(err)} (S3 endpoint {where}; each request is tried "
            f"{s3_max_attempts()} times with backoff, {MAX_ATTEMPTS_ENV} sets how many)"
        ) from err


def is_remote(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith("s3://")


def check_scheme(uri: str) -> None:
    """Raise ``ValueError`` for schemes other than local paths, ``file://`` and ``s3://``."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme not in ("", "file", "s3") and not (len(scheme) == 1 and os.name == "nt"):
        raise ValueError(f"unsupported storage scheme {scheme!r} in {uri!r} (use a local path or s3://)")


def local_path(uri: str) -> str:
    """The filesystem path of a local URI (strips ``file://``)."""
    if uri.startswith("file://"):
        return urllib.parse.urlparse(uri).path
    return uri


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_remote(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (S3) or ``os.path.join`` (local)."""
    if is_remote(uri):
        out = uri.rstrip("/")
        for part in parts:
            out = f"{out}/{part.strip('/')}"
        return out
    return os.path.join(local_path(uri), *parts)


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def endpoint_url(explicit: str | None = None) -> str | None:
    """The S3 endpoint to use: ``explicit``, else the first set of ``ENDPOINT_ENV_VARS``, else None."""
    if explicit:
        return explicit
    for name in ENDPOINT_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def endpoint_for(uri: str, explicit: str | None = None) -> str | None:
    """The S3 endpoint for ``uri``: ``endpoint_url(explicit)`` for an ``s3://`` URI, None for a local path."""
    return endpoint_url(explicit) if is_remote(uri) else None


def s3_client(endpoint: str | None = None) -> Any:
    """A boto3 S3 client (standard credential chain) for ``endpoint_url(endpoint)``.

    Clients are cached per process, endpoint and retry count; they are thread-safe but must not cross
    a fork, hence the pid in the cache key. Retries: ``botocore_config`` (module docstring).
    """
    import boto3  # deferred: heavy import

    url = endpoint_url(endpoint)
    key = (os.getpid(), url, s3_max_attempts())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            config = botocore_config(max_pool_connections=32)
            client = boto3.session.Session().client("s3", endpoint_url=url, config=config)
            _clients[key] = client
    return client


def export_streaming_endpoint(endpoint: str | None) -> None:
    """Make mosaicml-streaming (which reads only ``S3_ENDPOINT_URL``) use ``endpoint`` if one is set,
    and its boto3 client retry ``s3_max_attempts()`` times (``AWS_MAX_ATTEMPTS``, set if unset)."""
    url = endpoint_url(endpoint)
    if url:
        os.environ["S3_ENDPOINT_URL"] = url
    os.environ.setdefault(MAX_ATTEMPTS_ENV, str(s3_max_attempts()))


def _is_not_found(err: Exception) -> bool:
    code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def exists(uri: str, *, endpoint: str | None = None) -> bool:
    """Whether a file (object) exists at ``uri``."""
    if is_remote(uri):
        from botocore.exceptions import ClientError  # deferred: heavy import

        bucket, key = split_s3(uri)
        with _s3_errors("check", uri, endpoint):
            try:
                s3_client(endpoint).head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as err:
                if _is_not_found(err):
                    return False
                raise
    return os.path.isfile(local_path(uri))


def size(uri: str, *, endpoint: str | None = None) -> int:
    """Size in bytes of the file at ``uri``."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        with _s3_errors("read the size of", uri, endpoint):
            return int(s3_client(endpoint).head_object(Bucket=bucket, Key=key)["ContentLength"])
    return os.path.getsize(local_path(uri))


def read_bytes(uri: str, *, endpoint: str | None = None) -> bytes:
    """Whole file as bytes; ``FileNotFoundError`` naming the URI if it is missing."""
    if is_remote(uri):
        from botocore.exceptions import ClientError  # deferred: heavy import

        bucket, key = split_s3(uri)
        with _s3_errors("read", uri, endpoint):
            try:
                return s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
            except ClientError as err:
                if _is_not_found(err) or "NoSuchBucket" in str(err):
                    raise FileNotFoundError(uri) from err
                raise
    with open(local_path(uri), "rb") as f:
        return f.read()


def read_range(uri: str, offset: int, length: int, *, endpoint: str | None = None) -> bytes:
    """``length`` bytes starting at ``offset`` (one ranged GET on S3)."""
    if length <= 0:
        return b""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        rng = f"bytes={offset}-{offset + length - 1}"
        with _s3_errors(f"read {rng} of", uri, endpoint):
            return s3_client(endpoint).get_object(Bucket=bucket, Key=key, Range=rng)["Body"].read()
    with open(local_path(uri), "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_bytes(uri: str, data: bytes, *, endpoint: str | None = None) -> None:
    """Write a whole file; atomic for local paths (temporary file, then ``os.replace``)."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        with _s3_errors("write", uri, endpoint):
            s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = local_path(uri)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(uri: str, *, endpoint: str | None = None) -> Any:
    return json.loads(read_bytes(uri, endpoint=endpoint).decode("utf-8"))


def write_json(uri: str, obj: Any, *, endpoint: str | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"), endpoint=endpoint)


def upload_file(local: str, uri: str, *, endpoint: str | None = None) -> None:
    """Copy a local file to ``uri`` (multipart upload on S3; atomic copy locally)."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        with _s3_errors("write", uri, endpoint):
            s3_client(endpoint).upload_file(local, bucket, key)
        return
    dest = local_path(uri)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.copyfile(local, tmp)
    os.replace(tmp, dest)


def download_file(uri: str, local: str, *, endpoint: str | None = None) -> None:
    """Copy the file at ``uri`` to the local path ``local``."""
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    if is_remote(uri):
        bucket, key = split_s3(uri)
        with _s3_errors("read", uri, endpoint):
            s3_client(endpoint).download_file(bucket, key, local)
        return
    shutil.copyfile(local_path(uri), local)


def list_files(uri: str, *, endpoint: str | None = None, recursive: bool = True) -> list[str]:
    """Paths of the files below the folder ``uri``, relative to it, with ``/`` separators, sorted.

    A missing folder gives an empty list.
    """
    if is_remote(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        paginator = s3_client(endpoint).get_paginator("list_objects_v2")
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if not recursive:
            kwargs["Delimiter"] = "/"
        out = []
        with _s3_errors("list", uri, endpoint):
            for page in paginator.paginate(**kwargs):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) :]
                    if rel and not rel.endswith("/"):
                        out.append(rel)
        return sorted(out)
    root = Path(local_path(uri))
    if not root.is_dir():
        return []
    if not recursive:
        return sorted(p.name for p in root.iterdir() if p.is_file())
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def list_dirs(uri: str, *, endpoint: str | None = None) -> list[str]:
    """Names of the immediate sub-folders of ``uri`` (S3: common prefixes), sorted."""
    if is_remote(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        paginator = s3_client(endpoint).get_paginator("list_objects_v2")
        out = []
        with _s3_errors("list", uri, endpoint):
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    out.append(common["Prefix"][len(prefix) :].rstrip("/"))
        return sorted(out)
    root = Path(local_path(uri))
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def is_dir(uri: str, *, endpoint: str | None = None) -> bool:
    """Local: a directory. S3: some object exists below ``uri/``."""
    if is_remote(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        with _s3_errors("list", uri, endpoint):
            resp = s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return bool(resp.get("KeyCount", 0))
    return os.path.isdir(local_path(uri))


def delete_tree(uri: str, *, endpoint: str | None = None) -> None:
    """Delete the folder ``uri`` and everything below it (no error if it is missing)."""
    if is_remote(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        client = s3_client(endpoint)
        paginator = client.get_paginator("list_objects_v2")
        with _s3_errors("delete", uri, endpoint):
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                for i in range(0, len(keys), 1000):
                    client.delete_objects(
                        Bucket=bucket, Delete={"Objects": keys[i : i + 1000], "Quiet": True}
                    )
        return
    shutil.rmtree(local_path(uri), ignore_errors=True)


def delete_file(uri: str, *, endpoint: str | None = None) -> None:
    """Delete one file (no error if it is missing)."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        with _s3_errors("delete", uri, endpoint):
            s3_client(endpoint).delete_object(Bucket=bucket, Key=key)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(local_path(uri))


def upload_dir(local_dir: str, uri: str, *, endpoint: str | None = None, last: tuple[str, ...] = ()) -> None:
    """Copy every file below ``local_dir`` to ``uri``; the names in ``last`` are copied at the end.

    ``last`` lets a writer publish its completion marker (e.g. ``index.json``) only after the data
    it describes is in place.
    """
    root = Path(local_dir)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    ordered = [f for f in files if f not in last] + [f for f in last if f in files]
    for rel in ordered:
        upload_file(str(root / rel), join(uri, rel), endpoint=endpoint)


class RangeReader(io.RawIOBase):
    """A seekable, read-only file over an S3 object, fetched with ranged GETs.

    Wrap in ``io.BufferedReader`` for small reads. ``tarfile`` and ``pyarrow`` work on it.
    """

    def __init__(self, uri: str, *, endpoint: str | None = None) -> None:
        super().__init__()
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.endpoint = endpoint
        self.length = size(uri, endpoint=endpoint)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = min(len(buffer), self.length - self.pos)
        if n <= 0:
            return 0
        data = read_range(self.uri, self.pos, n, endpoint=self.endpoint)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def open_input(uri: str, *, endpoint: str | None = None, buffer_size: int = 1 << 20) -> BinaryIO:
    """A seekable binary file object for reading ``uri`` (local file, or ranged GETs on S3)."""
    if is_remote(uri):
        return io.BufferedReader(RangeReader(uri, endpoint=endpoint), buffer_size=buffer_size)  # type: ignore[return-value]
    return open(local_path(uri), "rb")


def open_stream(uri: str, *, endpoint: str | None = None) -> BinaryIO:
    """A forward-only binary stream over the whole of ``uri`` (one GET on S3)."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        with _s3_errors("read", uri, endpoint):
            body = s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"]
        return io.BufferedReader(_BodyRaw(body, uri, endpoint), buffer_size=1 << 20)  # type: ignore[return-value]
    return open(local_path(uri), "rb")


class _BodyRaw(io.RawIOBase):
    def __init__(self, body, uri: str, endpoint: str | None) -> None:
        super().__init__()
        self.body = body
        self.uri = uri
        self.endpoint = endpoint

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        with _s3_errors("read", self.uri, self.endpoint):
            data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


def pyarrow_filesystem(uri: str, *, endpoint: str | None = None):
    """``(pyarrow.fs.FileSystem, path)`` for ``uri``, with the S3 endpoint passed explicitly."""
    import pyarrow.fs as pafs  # deferred: heavy import

    if is_remote(uri):
        bucket, key = split_s3(uri)
        url = endpoint_url(endpoint)
        kwargs: dict[str, Any] = {}
        if url:
            parsed = urllib.parse.urlparse(url)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        # the same attempts per request as the boto3 clients (module docstring)
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=s3_max_attempts())
        kwargs["connect_timeout"] = S3_CONNECT_TIMEOUT_S
        kwargs["request_timeout"] = S3_READ_TIMEOUT_S
        return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))


def ray_storage(uri: str, *, endpoint: str | None = None) -> tuple[Any, str]:
    """``(storage_filesystem, storage_path)`` for a Ray Train / Tune ``RunConfig`` storing under ``uri``.

    ``s3://``: pyarrow's ``S3FileSystem`` with the endpoint passed explicitly (``pyarrow_filesystem``)
    and ``bucket/key``; a local path: ``(None, its absolute path)`` (Ray's own local filesystem).
    """
    if is_remote(uri):
        return pyarrow_filesystem(uri, endpoint=endpoint)
    return None, os.path.abspath(local_path(uri))


def walk_files(uri: str, *, endpoint: str | None = None) -> Iterator[str]:
    """Full URIs of all files below ``uri``, sorted."""
    for rel in list_files(uri, endpoint=endpoint):
        yield join(uri, rel)
