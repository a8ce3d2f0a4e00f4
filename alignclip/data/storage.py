"""Where images live: a local folder or an ``s3://bucket/prefix``. Listing never decodes an image."""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from alignclip import presets
from alignclip.log import get_logger

log = get_logger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


# Retries with exponential back-off and client-side rate limiting on throttling (botocore's "adaptive" mode);
# a pool large enough for the staging threads.
S3_RETRY_ATTEMPTS = 10
S3_POOL_CONNECTIONS = 64
STAGE_THREADS = 64
_clients: dict = {}
_clients_lock = threading.Lock()


def s3_client():
    """This process's S3 client, made once per process (a DataLoader worker makes its own after the fork) and per
    endpoint; errors are not retried forever and are raised as botocore exceptions for the caller to classify."""
    from botocore.config import Config

    key = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
           os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    client = _clients.get(key)
    if client is None:
        with _clients_lock:  # boto3's session is not thread-safe while it builds a client
            client = _clients.get(key)
            if client is None:
                config = Config(
                    retries={"max_attempts": S3_RETRY_ATTEMPTS, "mode": "adaptive"},
                    max_pool_connections=S3_POOL_CONNECTIONS,
                )
                client = _clients[key] = presets.s3_client(config)
    return client


def is_s3(root: str) -> bool:
    return str(root).startswith("s3://")


def join(root: str, relative: str) -> str:
    return f"{str(root).rstrip('/')}/{relative}" if is_s3(root) else os.path.join(root, relative)


def list_files(root: str, suffixes: tuple[str, ...] | None = IMG_EXTENSIONS) -> list[str]:
    """Every file below ``root`` (recursively) as a posix path relative to it, sorted; filtered by suffix.

    Local trees are walked with ``os.scandir`` (no stat of files beyond the directory entry): a DomainNet-sized
    tree of ~600k files lists in seconds.
    """
    if is_s3(root):
        return _list_s3(root, suffixes)
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
                if entry.is_dir(follow_symlinks=True):
                    stack.append(child)
                elif suffixes is None or entry.name.lower().endswith(suffixes):
                    found.append(child)
    found.sort()
    return found


def list_dirs(root: str) -> list[str]:
    """Immediate sub-folders of ``root``, sorted (DomainBed's environment and class order)."""
    if is_s3(root):
        bucket, prefix = _split(root)
        paginator = s3_client().get_paginator("list_objects_v2")
        names = set()
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                names.add(common["Prefix"][len(prefix) :].strip("/"))
        return sorted(names)
    if not Path(root).is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    return sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True))


def _split(root: str) -> tuple[str, str]:
    rest = root[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"bad S3 prefix {root!r}: expected s3://<bucket>/<prefix>")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def _list_s3(root: str, suffixes) -> list[str]:
    bucket, prefix = _split(root)
    paginator = s3_client().get_paginator("list_objects_v2")
    found = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if rel and (suffixes is None or rel.lower().endswith(suffixes)):
                found.append(rel)
    if not found and not list_dirs(root):
        raise FileNotFoundError(f"dataset prefix is empty or missing: {root}")
    found.sort()
    return found


def read_bytes(path: str) -> bytes:
    if is_s3(path):
        bucket, key = path[len("s3://") :].split("/", 1)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    with open(path, "rb") as handle:
        return handle.read()


def cache_path(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``s3://bucket/key`` is kept locally: ``<cache>/s3/<bucket>/<key>`` (as for checkpoints)."""
    bucket, key = uri[len("s3://") :].split("/", 1)
    cache = Path(cache_dir or os.environ.get("ALIGNCLIP_CACHE", Path.home() / ".cache" / "alignclip"))
    return cache / "s3" / bucket / key


def stage(paths: list[str], cache_dir: str | Path | None = None, threads: int = STAGE_THREADS) -> list[str]:
    """Copy the ``s3://`` images among ``paths`` to the local cache with parallel GETs, once per machine (a
    cached file is reused), and return the paths to read: local copies, or the remote path where the copy failed
    (reading it then raises the storage error). Local paths pass through.

    Per-image GETs inside DataLoader workers cost a request round trip per image on the training critical path;
    staged, the training reads local files (measured by bench/input_pipeline.py, see README).
    """
    remote = [p for p in dict.fromkeys(paths) if is_s3(p)]
    if not remote:
        return list(paths)
    client = s3_client()
    local: dict[str, str] = {}
    failed: list[tuple[str, str]] = []

    def fetch(uri: str) -> None:
        target = cache_path(uri, cache_dir)
        if not target.is_file():
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, key = uri[len("s3://") :].split("/", 1)
            try:
                body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
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
    log.info("staged %d images from S3 into %s", len(local), cache_path(remote[0], cache_dir).parents[0])
    return [local.get(p, p) for p in paths]


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def exists(path: str) -> bool:
    if is_s3(path):
        bucket, key = path[len("s3://") :].split("/", 1)
        from botocore.exceptions import ClientError

        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError:
            return False
    return os.path.exists(path)


def open_image(path: str) -> Image.Image:
    """Decode one image fully as RGB (raises on unreadable or truncated files)."""
    if is_s3(path):
        image = Image.open(io.BytesIO(read_bytes(path)))
    else:
        image = Image.open(path)
    image.load()
    return image.convert("RGB")
