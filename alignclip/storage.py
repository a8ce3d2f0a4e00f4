"""Storage: local files and S3 (or an S3-compatible store) behind one set of functions, with one error translation.

Everything the project reads or writes by URI goes through here: dataset listings and images (``alignclip.data``),
the resume checkpoint (``alignclip.resume.CheckpointStore``), the pre-trained weights fetched from ``s3://``
(``alignclip.presets``) and the local cache of fetched objects.

* URIs: ``is_s3``, ``parse_uri``, ``join``; the client (``client``: one per process and endpoint).
* Reading: ``list_files``, ``list_dirs``, ``read_bytes``, ``read_text``, ``read_if_exists``, ``exists``,
  ``open_image``; writing: ``write_bytes`` (local: ``publish.atomic_write_bytes``; S3: one PUT); ``delete``.
* Caching: ``cache_root``, ``cache_path``, ``fetch_object`` (one object), ``stage`` (a dataset's images).
* Errors: a failed S3 request becomes a ``StorageError`` (``storage_error``: one line naming the bucket, the
  endpoint and the cause; ``transient`` when worth retrying). Bytes that were read but are unusable as an image
  are an ``UnreadableImage``.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alignclip.log import get_logger
from alignclip.paths import PathOutsideRoot, confined, confined_key

log = get_logger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's

# ------------------------------------------------------------------------------------------ URIs and the client

SCHEME = "s3://"


def is_s3(path) -> bool:
    return str(path).startswith(SCHEME)


def parse_uri(uri: str, prefix: bool = False) -> tuple[str, str]:
    """``s3://bucket/key/with/slashes`` -> (bucket, key) naming one object; anything else is a ValueError naming
    the URI. ``prefix=True``: a folder, ``s3://bucket[/some/prefix[/]]`` -> (bucket, ``some/prefix/`` or ``""``)."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(SCHEME) :].partition("/")
    if prefix:
        if not bucket:
            raise ValueError(f"bad S3 prefix {uri!r}: expected s3://<bucket>/<prefix>")
        key = key.strip("/")
        return bucket, (key + "/" if key else "")
    if not bucket or not key or key.endswith("/"):
        raise ValueError(f"bad S3 URI {uri!r}: expected s3://<bucket>/<key> naming one object")
    return bucket, key


def join(root: str, relative: str) -> str:
    return f"{str(root).rstrip('/')}/{relative}" if is_s3(root) else os.path.join(root, relative)


# Retries with exponential back-off and client-side rate limiting when the store throttles (botocore's "adaptive"
# mode); a connection pool large enough for the threads that stage a dataset (``stage``). AWS_MAX_ATTEMPTS, the
# AWS SDKs' own variable, sets the attempts per request (botocore ignores it once a Config names them).
RETRY_ATTEMPTS = 10
POOL_CONNECTIONS = 64
_clients: dict = {}
_clients_lock = threading.Lock()


def retry_attempts() -> int:
    """Attempts per S3 request: ``AWS_MAX_ATTEMPTS`` when it is a positive integer, else ``RETRY_ATTEMPTS``."""
    value = os.environ.get("AWS_MAX_ATTEMPTS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else RETRY_ATTEMPTS


def endpoint_url() -> str | None:
    """The S3-compatible store's endpoint (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``); None: AWS S3."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def client():
    """This process's boto3 S3 client: made once per process (a forked DataLoader worker makes its own) and per
    endpoint/credentials; honours ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` for S3-compatible stores. Errors
    left after the retries are raised as botocore exceptions, for the caller to classify."""
    endpoint = endpoint_url()
    key = (os.getpid(), endpoint, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    made = _clients.get(key)
    if made is None:
        with _clients_lock:  # boto3's default session is not thread-safe while it builds a client
            made = _clients.get(key)
            if made is None:
                import boto3
                from botocore.config import Config

                config = Config(retries={"max_attempts": retry_attempts(), "mode": "adaptive"},
                                max_pool_connections=POOL_CONNECTIONS)
                made = _clients[key] = boto3.client("s3", endpoint_url=endpoint, config=config)
    return made


# ------------------------------------------------------------------------------------------ errors

class StorageError(RuntimeError):
    """Bytes could not be fetched (or stored): the store, the network, the credentials or a missing file, not the
    image or checkpoint.
    It stops the stage with one line naming the bucket/endpoint (or file) and the cause. ``transient``: worth
    retrying (the endpoint is down or overloaded), as opposed to a missing bucket or rejected credentials."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class UnreadableImage(ValueError):
    """The file's bytes were read but do not decode as an image: the only thing that makes an image unreadable."""


# Error codes of S3-compatible stores: credentials, missing things, and overload (transient).
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "403"}
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling", "500", "502", "503", "504"}


def _endpoint() -> str:
    return endpoint_url() or "AWS S3"


def storage_error(err: Exception, uri: str) -> StorageError:
    """One line for a failed S3 request (after botocore's own retries): what, where, and what to check."""
    from botocore import exceptions as be

    bucket = uri[len("s3://") :].split("/", 1)[0]
    endpoint = _endpoint()
    if isinstance(err, (be.NoCredentialsError, be.PartialCredentialsError)):
        return StorageError(
            f"no S3 credentials for s3://{bucket} at {endpoint}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or a role of the pod)"
        )
    if isinstance(err, (be.EndpointConnectionError, be.ConnectTimeoutError, be.ReadTimeoutError, be.ConnectionClosedError)):
        return StorageError(f"S3 endpoint {endpoint} unreachable reading {uri} ({type(err).__name__})", transient=True)
    if isinstance(err, be.ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code == "NoSuchBucket":
            return StorageError(f"bucket {bucket!r} does not exist at {endpoint}")
        if code in _CREDENTIAL_CODES or status == "403":
            return StorageError(
                f"S3 credentials rejected by {endpoint} for s3://{bucket} ({code or status}): check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions"
            )
        if code in ("NoSuchKey", "404") or status == "404":
            return StorageError(f"object not found: {uri} (moved or deleted since `alignclip prepare`?)")
        transient = code in _TRANSIENT_CODES or status.startswith("5")
        return StorageError(f"S3 error at {endpoint} reading {uri}: {code or status} {error.get('Message', '')}".strip(), transient)
    if isinstance(err, be.BotoCoreError):
        return StorageError(f"S3 request to {endpoint} for {uri} failed: {err}", transient=True)
    return StorageError(f"reading {uri} failed: {type(err).__name__}: {err}")


def _s3_call(uri: str, call):
    """Run an S3 request; botocore errors become a StorageError naming the bucket, endpoint and cause."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call()
    except (BotoCoreError, ClientError) as err:
        raise storage_error(err, uri) from err


# ------------------------------------------------------------------------------------------ listing

def list_files(root: str, suffixes: tuple[str, ...] | None = IMG_EXTENSIONS) -> list[str]:
    """Every file below ``root`` (recursively) as a posix path relative to it, sorted; filtered by suffix.

    Local trees are walked with ``os.scandir`` (no stat of files beyond the directory entry): a DomainNet-sized
    tree of ~600k files lists in seconds.
    """
    if is_s3(root):
        return _s3_call(root, lambda: _list_s3(root, suffixes))
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    found: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as entries:
            for entry in entries:
                child = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_symlink():  # only links are resolved: listing stays one scandir per folder
                    confined(root, child, f"file of {root}:")
                if entry.is_dir(follow_symlinks=True):
                    stack.append(child)
                elif suffixes is None or entry.name.lower().endswith(suffixes):
                    found.append(child)
    found.sort()
    return found


def list_dirs(root: str) -> list[str]:
    """Immediate sub-folders of ``root``, sorted (DomainBed's environment and class order)."""
    if is_s3(root):
        return _s3_call(root, lambda: _list_s3_dirs(root))
    if not Path(root).is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    return sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True))


def _list_s3_dirs(root: str) -> list[str]:
    bucket, prefix = parse_uri(root, prefix=True)
    paginator = client().get_paginator("list_objects_v2")
    names = set()
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for common in page.get("CommonPrefixes", []):
            names.add(common["Prefix"][len(prefix) :].strip("/"))
    return sorted(names)


def _list_s3(root: str, suffixes) -> list[str]:
    bucket, prefix = parse_uri(root, prefix=True)
    paginator = client().get_paginator("list_objects_v2")
    found = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if rel and (suffixes is None or rel.lower().endswith(suffixes)):
                confined_key(root, rel, f"S3 key {obj['Key']!r} of {root}: relative name")
                found.append(rel)
    if not found and not _list_s3_dirs(root):
        raise FileNotFoundError(f"dataset prefix is empty or missing: {root}")
    found.sort()
    return found


# ------------------------------------------------------------------------------------------ reading and writing

# The most bytes read for one image: a bounded read, so a huge or endless file cannot exhaust memory. Far above
# any image of the benchmarks (ImageNet's largest JPEG is ~15 MB).
MAX_IMAGE_BYTES = int(os.environ.get("ALIGNCLIP_MAX_IMAGE_BYTES", 256 * 2**20))

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _not_regular(path: str, mode: int) -> UnreadableImage:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return UnreadableImage(f"{path}: {kind}, not a regular file: not opened")


def read_bytes(path: str, limit: int | None = None) -> bytes:
    """The file's bytes; any failure to fetch them is a StorageError (never taken for a bad image).

    ``limit``: the most bytes to read (an image: ``MAX_IMAGE_BYTES``); a larger file is an ``UnreadableImage``.
    A local path
    must be a regular file, checked with ``os.stat`` before it is opened (a FIFO would block the reader forever,
    a device never end) and again on the opened descriptor (opened non-blocking, in case it was swapped).
    """
    if is_s3(path):
        bucket, key = parse_uri(path)
        response = _s3_call(path, lambda: client().get_object(Bucket=bucket, Key=key))
        if limit is not None and response.get("ContentLength", 0) > limit:
            raise UnreadableImage(f"{path}: {response['ContentLength']} bytes, more than the {limit}-byte cap")
        data = _s3_call(path, lambda: response["Body"].read() if limit is None else response["Body"].read(limit + 1))
        if limit is not None and len(data) > limit:
            raise UnreadableImage(f"{path}: more than the {limit}-byte cap")
        return data
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, info.st_mode)
        if limit is not None and info.st_size > limit:
            raise UnreadableImage(f"{path}: {info.st_size} bytes, more than the {limit}-byte cap")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise _not_regular(path, mode)
            data = handle.read() if limit is None else handle.read(limit + 1)
    except FileNotFoundError:
        raise StorageError(f"file not found: {path} (moved or deleted since `alignclip prepare`?)") from None
    except OSError as err:
        raise StorageError(f"cannot read {path}: {err.strerror or err}") from None
    if limit is not None and len(data) > limit:
        raise UnreadableImage(f"{path}: more than the {limit}-byte cap")
    return data


def check_inside(path: str, roots: list[str]) -> None:
    """A local ``path``, symlinks resolved, must be below one of ``roots`` (resolved folders); else it is an
    UnreadableImage and never opened. Remote paths have no symlinks (their names are checked by paths.py)."""
    if is_s3(path):
        return
    real = os.path.realpath(path)
    if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        raise UnreadableImage(f"{path}: resolves to {real}, outside the dataset root: not opened")


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def exists(path: str) -> bool:
    if is_s3(path):
        from botocore.exceptions import ClientError

        bucket, key = parse_uri(path)

        def head() -> bool:
            try:
                client().head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as err:
                if str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")) == "404":
                    return False
                raise

        return _s3_call(path, head)
    return os.path.exists(path)


def read_if_exists(path: str) -> bytes | None:
    """The bytes of ``path``, or None where there is no such object or file (a checkpoint not written yet)."""
    if is_s3(path):
        from botocore.exceptions import ClientError

        bucket, key = parse_uri(path)

        def get() -> bytes | None:
            try:
                return client().get_object(Bucket=bucket, Key=key)["Body"].read()
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

        return _s3_call(path, get)
    local = Path(path)
    return local.read_bytes() if local.is_file() else None


def write_bytes(path: str, data: bytes) -> None:
    """Write ``path`` whole or not at all: an S3 PUT is all or nothing; a local file is written atomically
    (``publish.atomic_write_bytes``: a temporary file renamed over it)."""
    if is_s3(path):
        bucket, key = parse_uri(path)
        _s3_call(path, lambda: client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    from alignclip.publish import atomic_write_bytes

    atomic_write_bytes(path, data)


def delete(path: str) -> None:
    """Remove ``path`` if it exists. A local file goes with the temporary files that an atomic write of it killed
    mid-way left behind (``publish.leftover_temporaries``)."""
    if is_s3(path):
        bucket, key = parse_uri(path)
        _s3_call(path, lambda: client().delete_object(Bucket=bucket, Key=key))
        return
    from alignclip.publish import leftover_temporaries

    Path(path).unlink(missing_ok=True)
    for stale in leftover_temporaries(path):
        stale.unlink(missing_ok=True)


def open_image(path: str):
    """Decode one image fully as RGB. Fetching the bytes can raise StorageError; bytes that do not decode (not
    an image, truncated), a file that is not a regular one or larger than ``MAX_IMAGE_BYTES`` raise UnreadableImage
    (``check_inside`` refuses a file outside the dataset's roots before this)."""
    from PIL import Image  # here: the CLI, resume and presets import this module and never decode an image

    data = read_bytes(path, MAX_IMAGE_BYTES)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes; all mean "not an image"
        raise UnreadableImage(f"{path}: {type(err).__name__}: {err}") from None


# ------------------------------------------------------------------------------------------ the local cache

def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The local cache of fetched objects: ``cache_dir``, else ``ALIGNCLIP_CACHE``, else ~/.cache/alignclip."""
    return Path(cache_dir or os.environ.get("ALIGNCLIP_CACHE", Path.home() / ".cache" / "alignclip"))


def cache_path(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``s3://bucket/key`` is kept locally: ``<cache>/s3/<bucket>/<key>``, the key confined to its bucket's
    folder (a key with ``..`` segments or a leading ``/`` is refused, never written outside the cache)."""
    bucket, key = parse_uri(uri)
    if bucket in ("", ".", "..") or "/" in bucket:
        raise PathOutsideRoot(f"S3 bucket {bucket!r} of {uri} refused: not a bucket name")
    return confined(cache_root(cache_dir) / "s3" / bucket, key, f"S3 key of {uri}:")


def fetch_object(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Download one S3 object to the local cache (once) and return its path."""
    target = cache_path(uri, cache_dir)
    bucket, key = parse_uri(uri)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from botocore.exceptions import BotoCoreError, ClientError

    partial = target.with_suffix(target.suffix + ".partial")
    try:
        client().download_file(bucket, key, str(partial))
    except (ClientError, BotoCoreError) as err:
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(f"cannot fetch {uri}: {err}") from err
    partial.rename(target)
    return target


def stage(paths: list[str], cache_dir: str | Path | None = None, threads: int = POOL_CONNECTIONS) -> list[str]:
    """Copy the ``s3://`` images among ``paths`` to the local cache with parallel GETs, once per machine (a
    cached file is reused), and return the paths to read: local copies, or the remote path where the copy failed
    (reading it then raises the storage error). Local paths pass through.

    Per-image GETs inside DataLoader workers cost a request round trip per image on the training critical path;
    staged, the training reads local files (measured by bench/input_pipeline.py, see README).
    """
    remote = [p for p in dict.fromkeys(paths) if is_s3(p)]
    if not remote:
        return list(paths)
    targets = {uri: cache_path(uri, cache_dir) for uri in remote}  # every key confined before anything is fetched
    s3 = client()  # one client for the threads (boto3 clients are thread-safe)
    local: dict[str, str] = {}
    failed: list[tuple[str, str]] = []

    def fetch(uri: str) -> None:
        target = targets[uri]
        if not target.is_file():
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, key = parse_uri(uri)
            try:
                body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except (BotoCoreError, ClientError) as err:
                failed.append((uri, f"{type(err).__name__}: {err}"))
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
            partial.write_bytes(body)
            os.replace(partial, target)  # readers never see a half-written file
        local[uri] = str(target)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(fetch, remote))
    if failed:
        log.warning("%d of %d images could not be staged (first: %s %s); they are read from S3", len(failed),
                    len(remote), *failed[0])
    log.info("staged %d images from S3 into %s", len(local), cache_root(cache_dir) / "s3")
    return [local.get(p, p) for p in paths]


