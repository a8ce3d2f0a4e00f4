"""S3 (and S3-compatible stores): the one URI parser, the client, and the local cache of fetched objects.

Model weights (presets) and dataset images (data.storage) both read through here.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

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


# Retries with exponential back-off and client-side rate limiting when the store throttles (botocore's "adaptive"
# mode); a connection pool large enough for the threads that stage a dataset (data.storage.stage).
RETRY_ATTEMPTS = 10
POOL_CONNECTIONS = 64
_clients: dict = {}
_clients_lock = threading.Lock()


def client():
    """This process's boto3 S3 client: made once per process (a forked DataLoader worker makes its own) and per
    endpoint/credentials; honours ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` for S3-compatible stores. Errors
    left after the retries are raised as botocore exceptions, for the caller to classify."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    key = (os.getpid(), endpoint, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    made = _clients.get(key)
    if made is None:
        with _clients_lock:  # boto3's default session is not thread-safe while it builds a client
            made = _clients.get(key)
            if made is None:
                import boto3
                from botocore.config import Config

                config = Config(retries={"max_attempts": RETRY_ATTEMPTS, "mode": "adaptive"},
                                max_pool_connections=POOL_CONNECTIONS)
                made = _clients[key] = boto3.client("s3", endpoint_url=endpoint, config=config)
    return made


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The local cache of fetched objects: ``cache_dir``, else ``ALIGNCLIP_CACHE``, else ~/.cache/alignclip."""
    return Path(cache_dir or os.environ.get("ALIGNCLIP_CACHE", Path.home() / ".cache" / "alignclip"))


def cache_path(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``s3://bucket/key`` is kept locally: ``<cache>/s3/<bucket>/<key>``, the key confined to its bucket's
    folder (a key with ``..`` segments or a leading ``/`` is refused, never written outside the cache)."""
    from alignclip.paths import PathOutsideRoot, confined

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
