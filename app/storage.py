"""Object storage: datasets, checkpoints and adapters, on S3 (boto3) or a local directory.

`open_store(url)` picks the backend from the URL: `s3://bucket/prefix` or `file:///path`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

CHUNK = 1024 * 1024


def team_prefix(team_id: str) -> str:
    """Every object a team owns lives under this prefix, and reads check it."""
    return f"teams/{team_id}/"


def file_key(team_id: str, file_id: str) -> str:
    return f"{team_prefix(team_id)}files/{file_id}"


def checkpoint_key(team_id: str, job_id: str, step: int) -> str:
    return f"{team_prefix(team_id)}jobs/{job_id}/checkpoints/step-{step}.tar.gz"


class ObjectStore(Protocol):
    def put(self, key: str, stream: BinaryIO) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def iter_chunks(self, key: str, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """The object's bytes [start, stop) (to the end when stop is None), a chunk at a
        time: a download of any size holds one chunk in memory."""

    def download_url(
        self, key: str, seconds: int, *, disposition: str, media_type: str
    ) -> str | None:
        """A URL that lets anyone holding it GET the object for `seconds`, answered with
        these Content-Disposition and Content-Type; None where the store has no such URLs
        (a local directory)."""

    def delete(self, key: str) -> None: ...
    def list_older(self, prefix: str, seconds: float) -> Iterator[str]:
        """Keys under `prefix` last written more than `seconds` ago."""

    def abort_stale_uploads(self, seconds: float) -> int:
        """Drop unfinished uploads older than `seconds` (a process died mid-upload)."""

    def check(self) -> None:
        """Raise if the store is unreachable (used by /readyz)."""


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"object key escapes the store: {key}")
        return path

    def put(self, key: str, stream: BinaryIO) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            with partial.open("wb") as out:
                shutil.copyfileobj(stream, out, CHUNK)
            partial.replace(path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path) -> None:
        with path.open("rb") as stream:
            self.put(key, stream)

    def get_file(self, key: str, path: Path) -> None:
        shutil.copyfile(self._path(key), path)

    def iter_chunks(self, key: str, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        with self._path(key).open("rb") as stream:
            stream.seek(start)
            left = None if stop is None else stop - start
            while left is None or left > 0:
                chunk = stream.read(CHUNK if left is None else min(CHUNK, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def download_url(
        self, key: str, seconds: int, *, disposition: str, media_type: str
    ) -> str | None:
        return None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list_older(self, prefix: str, seconds: float) -> Iterator[str]:
        cutoff = time.time() - seconds
        base = self._path(prefix)
        if not base.exists():
            return
        for path in base.rglob("*"):
            if path.is_file() and not path.name.endswith(".partial"):
                if path.stat().st_mtime < cutoff:
                    yield str(path.relative_to(self.root.resolve()))

    def abort_stale_uploads(self, seconds: float) -> int:
        cutoff, dropped = time.time() - seconds, 0
        for path in self.root.resolve().rglob("*.partial"):
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                dropped += 1
        return dropped

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)


class S3Store:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None) -> None:
        import boto3  # imported here so the local backend needs no AWS setup
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        from boto3.s3.transfer import TransferConfig

        # botocore's "standard" retries: throttling, 5xx and connection errors are retried
        # with backoff (8 attempts), so a blip of the object store fails nothing.
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            # SigV4 for presigned URLs too (botocore may presign with the legacy SigV2,
            # which AWS regions opened since 2014 refuse).
            config=Config(
                retries={"max_attempts": 8, "mode": "standard"}, signature_version="s3v4"
            ),
        )
        # A non-seekable upload stream is buffered a part at a time; keep few parts in flight
        # so a large upload holds ~2 x 8 MB in memory, not s3transfer's default of 10 parts.
        self.transfer = TransferConfig(max_concurrency=2)
        self.transfer.max_in_memory_upload_chunks = 2  # s3transfer's knob; boto3 has no kwarg

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, stream: BinaryIO) -> None:
        # upload_fileobj streams in multipart chunks: the object is never whole in memory.
        self.client.upload_fileobj(stream, self.bucket, self._key(key), Config=self.transfer)

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def get_file(self, key: str, path: Path) -> None:
        self.client.download_file(self.bucket, self._key(key), str(path))

    def iter_chunks(self, key: str, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        ranged = {}
        if start or stop is not None:  # GetObject's Range names the last byte, not the stop
            ranged["Range"] = f"bytes={start}-{'' if stop is None else stop - 1}"
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **ranged)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def download_url(
        self, key: str, seconds: int, *, disposition: str, media_type: str
    ) -> str | None:
        # Signed by the API's credentials, for this one object: the response headers S3 sends
        # (the download's name and type) are part of the signature, so they cannot be changed.
        return self.client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self._key(key),
                "ResponseContentDisposition": disposition,
                "ResponseContentType": media_type,
            },
            ExpiresIn=seconds,
        )

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list_older(self, prefix: str, seconds: float) -> Iterator[str]:
        cutoff = time.time() - seconds
        strip = len(self._key(""))
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix)
        )
        for page in pages:
            for item in page.get("Contents", []):
                if item["LastModified"].timestamp() < cutoff:
                    yield item["Key"][strip:]

    def abort_stale_uploads(self, seconds: float) -> int:
        cutoff, dropped = time.time() - seconds, 0
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self._key("")
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() < cutoff:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    dropped += 1
        return dropped

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def open_store(url: str, s3_endpoint_url: str | None = None) -> ObjectStore:
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path, s3_endpoint_url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    raise ValueError(f"LATHE_STORAGE_URL must be s3://bucket/prefix or file:///path, not {url}")
