"""Object stores: S3 (any S3-compatible endpoint, through boto3) and a local directory.

Both give the same small interface. A `put` is atomic for readers: they see the whole object
or none of it (S3 PUT semantics; write-to-temp + rename locally). Episode commit order
(chunks, then manifest) is built on that in buffer/codec.py.
"""
from __future__ import annotations

import errno
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Protocol
from urllib.parse import urlparse

from fleetloop.config import S3Settings
from fleetloop.files import write_atomic


class StoreError(Exception):
    """The store could not serve the request (network, outage, throttling). Retry later."""


class ObjectNotFound(KeyError):
    """The key does not exist. Not transient."""


class ObjectStore(Protocol):
    uri: str

    def put(self, key: str, data: bytes) -> None: ...
    def put_new(self, key: str, data: bytes) -> bool: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def get_range(self, key: str, start: int, length: int) -> tuple[bytes, int]: ...
    def list(self, prefix: str = "") -> Iterator[str]: ...
    def delete(self, key: str) -> None: ...


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"invalid object key {key!r}")
    return key


class LocalStore:
    """A directory tree; keys are relative paths. The embedded default."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    def put_new(self, key: str, data: bytes) -> bool:
        """Write-once: store `data` only if `key` does not exist yet (atomically: a hard link of
        the finished temp file, which fails if the name is taken). False when it existed."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                if path.exists():  # a filesystem without hard links: check, then rename (not atomic)
                    return False
                os.replace(tmp, path)
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def get_range(self, key: str, start: int, length: int) -> tuple[bytes, int]:
        """`length` bytes from `start` (fewer at the end), and the object's total size."""
        try:
            with open(self._path(key), "rb") as f:
                total = os.fstat(f.fileno()).st_size
                f.seek(start)
                return f.read(length), total
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self.root
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/")
                if key.startswith(prefix):
                    yield key

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass


class S3Store:
    """s3://bucket/prefix through boto3; works with AWS, MinIO, moto's server, Ceph, R2..."""

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None):
        import boto3
        from botocore.config import Config

        self.settings = settings or S3Settings()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._local = threading.local()  # boto3 clients are thread-safe, sessions are not
        self._warned_unconditional = False  # put_new on a server without conditional writes: said once
        self._boto3 = boto3
        self._config = Config(retries={"max_attempts": 2, "mode": "standard"},
                              connect_timeout=5, read_timeout=30, max_pool_connections=64,
                              request_checksum_calculation="when_required",
                              response_checksum_validation="when_required")
        self._client = self._make_client()
        if self.settings.create_bucket:
            self._ensure_bucket()

    def _make_client(self):
        s = self.settings
        return self._boto3.session.Session().client(
            "s3", endpoint_url=s.endpoint_url, region_name=s.region,
            aws_access_key_id=s.access_key, aws_secret_access_key=s.secret_key, config=self._config)

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self._client.create_bucket(Bucket=self.bucket)
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise StoreError(f"cannot create bucket {self.bucket}: {e}") from e
        except Exception as e:  # endpoint down: start anyway, puts retry until it is back
            import logging
            logging.getLogger(__name__).warning("S3 endpoint unreachable at start (%s); will retry on use", e)

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            return fn(**kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(kw.get("Key", "")) from None
            raise StoreError(f"S3 {code}: {e}") from e
        except BotoCoreError as e:
            raise StoreError(f"S3 request failed: {e}") from e

    def put(self, key: str, data: bytes) -> None:
        self._call(self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_new(self, key: str, data: bytes) -> bool:
        """Write-once: a conditional PUT (If-None-Match: *); False when the key exists (412). A
        bucket policy can then require the header for a prefix (docs/security.md), so nobody
        overwrites what is there."""
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412"):
                return False
            if code in ("NotImplemented", "501"):  # an older S3-compatible server: plain PUT, said once
                if not self._warned_unconditional:
                    self._warned_unconditional = True
                    import logging
                    logging.getLogger(__name__).warning(
                        "%s does not support conditional writes (If-None-Match); episode objects are not "
                        "write-once on it (docs/security.md)", self.uri)
                self.put(key, data)
                return True
            raise StoreError(f"S3 {code}: {e}") from e
        except BotoCoreError as e:
            raise StoreError(f"S3 request failed: {e}") from e

    def get(self, key: str) -> bytes:
        resp = self._call(self._client.get_object, Bucket=self.bucket, Key=self._key(key))
        from botocore.exceptions import BotoCoreError
        try:
            return resp["Body"].read()
        except BotoCoreError as e:
            raise StoreError(f"S3 read failed: {e}") from e

    def exists(self, key: str) -> bool:
        try:
            self._call(self._client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except ObjectNotFound:
            return False

    def size(self, key: str) -> int:
        resp = self._call(self._client.head_object, Bucket=self.bucket, Key=self._key(key))
        return int(resp["ContentLength"])

    def get_range(self, key: str, start: int, length: int) -> tuple[bytes, int]:
        """`length` bytes from `start` (fewer at the end), and the object's total size, in one
        request (the total comes from Content-Range)."""
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key),
                                           Range=f"bytes={start}-{start + length - 1}")
            # read(length): a server that ignores Range (200, whole object) still costs `length`
            data = resp["Body"].read(length)
            resp["Body"].close()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(key) from None
            if code == "InvalidRange":  # start past the end
                return b"", self.size(key)
            raise StoreError(f"S3 {code}: {e}") from e
        except BotoCoreError as e:
            raise StoreError(f"S3 request failed: {e}") from e
        content_range = resp.get("ContentRange") or ""
        total = int(content_range.rsplit("/", 1)[1]) if "/" in content_range else int(resp["ContentLength"])
        return data, total

    def list(self, prefix: str = "") -> Iterator[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        paginator = self._client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield obj["Key"][strip:]
        except (BotoCoreError, ClientError) as e:
            raise StoreError(f"S3 list failed: {e}") from e

    def delete(self, key: str) -> None:
        self._call(self._client.delete_object, Bucket=self.bucket, Key=self._key(key))


def open_store(uri: str, s3: S3Settings | None = None) -> ObjectStore:
    """Open a store from its URI: file:///path or s3://bucket/prefix (see fleetloop.config)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"store URI {uri!r} has no bucket")
        return S3Store(parsed.netloc, parsed.path, s3)
    if parsed.scheme == "" and uri:
        return LocalStore(uri)  # a bare path is a local directory
    raise ValueError(f"unsupported store URI {uri!r}: use file:///path or s3://bucket/prefix")
