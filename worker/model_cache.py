"""Base models, from wherever this GPU pool keeps them: `resolve_base_model` returns a local
directory that `from_pretrained` can load.

A `BaseModelSpec.path` is one of:

- a local directory, used in place;
- ``s3://bucket/prefix``: the prefix's objects are the model's files (``prefix/config.json``,
  ``prefix/sub/x`` -> ``sub/x``; directory markers, keys ending in ``/``, are skipped). It is
  downloaded once per worker host into the model cache and reused by every later job;
- a Hugging Face hub id ``org/name`` that is not a local directory: found in the host's
  Hugging Face cache, which must be filled beforehand (``hf download org/name``). Nothing is
  ever downloaded from the hub.

With no path, ``tiny-random-llama`` is generated into ``models_dir`` (as before) and any other
name is the directory ``models_dir/name``.

The model cache (``Settings.resolved_model_cache_dir``) is shared by all worker processes of
a host (one per GPU)::

    .lock           fcntl lock: one process at a time downloads, repairs or evicts
    .staging/       downloads in progress, renamed into place whole; anything here when
                    the lock is taken was left by a dead process and is removed
    .pins/ENTRY     a shared fcntl lock on it, held by each process that uses ENTRY
    ENTRY/          one whole model: its files, .lathe-manifest.json, .lathe-last-used

A model only ever appears whole: it is downloaded into ``.staging`` and renamed into place
after every file passed its checks (the MD5 in a plain, single-part ETag; the SHA256SUMS file
when the prefix has one). The manifest records each file's size and SHA-256; a cached model is
reused when every file it lists is there with its size. Its ``.lathe-last-used`` marker is
touched on every resolve; when adding a model would take the cache past
``model_cache_max_gb``, the least recently used models are evicted, never the one being
resolved nor one another process is using (pinned: a process keeps the pin of the last base
model it resolved until it resolves another or exits; a job's training process is a fresh
process, so that is the job's lifetime). Models in use that cannot be evicted let the cache
run over its bound, with a warning, rather than fail the job.

This module never imports torch at import time (the tiny model's generator is imported only
when that model is resolved).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from botocore.exceptions import BotoCoreError, ClientError

from app.config import TINY_RANDOM_LLAMA, BaseModelSpec, Settings

log = logging.getLogger(__name__)

MANIFEST = ".lathe-manifest.json"
LAST_USED = ".lathe-last-used"
SUMS_FILE = "SHA256SUMS"
RESERVED = {MANIFEST, LAST_USED}
CHUNK = 8 * 1024 * 1024
DOWNLOAD_THREADS = 4
BYTES_PER_GB = 10**9

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


class BaseModelUnavailable(RuntimeError):
    """A base model cannot be made available on this worker: the message names the model,
    where it was to come from, and what is wrong."""

    def __init__(self, model: str, source: str, problem: str) -> None:
        self.model = model
        self.source = source
        self.problem = problem
        super().__init__(f"base model {model!r} from {source}: {problem}")


def resolve_base_model(base: BaseModelSpec, settings: Settings) -> Path:
    """A local directory holding `base`'s config, tokenizer and weights; raises
    BaseModelUnavailable when there is none (see the module docstring for the sources)."""
    path = base.path
    if not path:
        _keep_pin(None)
        target = settings.base_model_path(base)
        if base.name == TINY_RANDOM_LLAMA:
            from worker.training.tiny_model import ensure_tiny_random_llama

            return ensure_tiny_random_llama(target, base.chat_template or "")
        if not target.is_dir():
            raise BaseModelUnavailable(
                base.name, str(target), "no `path` is configured and there is no such directory"
            )
        return target
    if path.startswith("s3://"):
        return _resolve_s3(base, path, settings)
    _keep_pin(None)
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if _HUB_ID.match(path) and ".." not in path and "--" not in path:
        return _resolve_hub(base, path)
    raise BaseModelUnavailable(
        base.name, path, "no such local directory (nor an s3:// prefix or an org/name hub id)"
    )


# --- Hugging Face cache ------------------------------------------------------------------


def hf_hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use, read from the environment now (its own
    constants are fixed when it is first imported)."""
    env = os.environ

    def expand(value: str) -> Path:
        return Path(os.path.expandvars(value)).expanduser()

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return expand(env[name])
    if env.get("HF_HOME"):
        return expand(env["HF_HOME"]) / "hub"
    return expand(env.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface" / "hub"


def _resolve_hub(base: BaseModelSpec, repo_id: str) -> Path:
    cache = hf_hub_cache_dir()
    how = (
        f"Lathe never downloads from the hub: pre-populate the cache on every worker host "
        f"with `hf download {repo_id} --cache-dir {cache}` (or set HF_HUB_CACHE / HF_HOME "
        f"to a cache that has it)"
    )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:
        raise BaseModelUnavailable(
            base.name, repo_id, "not a local directory, and huggingface_hub is not installed"
        ) from exc
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as exc:  # incomplete snapshot; bad id
        raise BaseModelUnavailable(
            base.name,
            repo_id,
            f"not a local directory, and not in the Hugging Face cache searched, {cache} "
            f"(HF_HUB_CACHE, else HF_HOME/hub): {exc}. {how}",
        ) from exc
    if not (folder / "config.json").is_file():
        raise BaseModelUnavailable(
            base.name,
            repo_id,
            f"the cached snapshot {folder} has no config.json (an interrupted download?). {how}",
        )
    return folder


# --- S3 ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Object:
    key: str
    rel: str  # path under the model directory
    size: int
    etag: str  # without its quotes


def _s3_client(settings: Settings) -> Any:
    """An S3 client built as the object store builds its own (same endpoint setting)."""
    from app.storage import S3Store

    return S3Store("", "", settings.s3_endpoint_url).client


def entry_name(url: str) -> str:
    """The cache directory name for an s3:// prefix: readable, and unique per prefix."""
    tail = PurePosixPath(urlparse(url).path.rstrip("/")).name or urlparse(url).netloc
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", tail).lstrip(".")[:80] or "model"
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def _resolve_s3(base: BaseModelSpec, url: str, settings: Settings) -> Path:
    parsed = urlparse(url)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    if not bucket:
        raise BaseModelUnavailable(base.name, url, "the s3:// URL names no bucket")
    cache = settings.resolved_model_cache_dir
    entry = entry_name(url)
    target = cache / entry
    bound = round(settings.model_cache_max_gb * BYTES_PER_GB)
    for folder in (cache, cache / ".staging", cache / ".pins"):
        folder.mkdir(parents=True, exist_ok=True)
    _keep_pin(cache / ".pins" / entry)
    try:
        if _whole(target) is not None:  # pinned: no one evicts it between check and use
            _touch(target)
            return target
        with _cache_lock(cache, base.name):
            if _whole(target) is not None:  # another process downloaded it meanwhile
                _touch(target)
                return target
            if target.exists():
                log.warning("cached model %s is incomplete or damaged; downloading again", target)
                _discard(target, cache)
            for leftover in (cache / ".staging").iterdir():  # a dead process's
                shutil.rmtree(leftover, ignore_errors=True)
            client = _s3_client(settings)
            objects, sums = _list_model(client, bucket, prefix, base.name, url)
            total = sum(o.size for o in objects)
            if total > bound:
                raise BaseModelUnavailable(
                    base.name,
                    url,
                    f"the model is {total / BYTES_PER_GB:.3f} GB, more than the whole model "
                    f"cache may hold (LATHE_MODEL_CACHE_MAX_GB={settings.model_cache_max_gb})",
                )
            _evict(cache, total, bound, keep=entry)
            staging = Path(tempfile.mkdtemp(prefix=f"{entry}.", dir=cache / ".staging"))
            try:
                log.info("downloading base model %s from %s (%d bytes)", base.name, url, total)
                files = _download(client, bucket, objects, sums, staging, base.name, url)
                manifest = {
                    "model": base.name,
                    "source": url,
                    "downloaded_at": time.time(),
                    "total_bytes": total,
                    "checked_against_sha256sums": sums is not None,
                    "files": files,
                }
                (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
                _touch(staging)
                os.rename(staging, target)  # atomic: the model appears whole or not at all
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            log.info("base model %s cached in %s", base.name, target)
            return target
    except BaseException:
        _keep_pin(None)
        raise


def _list_model(
    client: Any, bucket: str, prefix: str, model: str, url: str
) -> tuple[list[_Object], dict[str, str] | None]:
    """The prefix's files, and SHA256SUMS's digests by relative path (None: no such file)."""
    key_prefix = f"{prefix}/" if prefix else ""
    objects: list[_Object] = []
    sums_key = None
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix)
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"]
                if key.endswith("/"):  # a "directory" marker
                    continue
                rel = key[len(key_prefix) :]
                if rel == SUMS_FILE:
                    sums_key = key
                    continue
                _check_relative(rel, model, url)
                etag = item.get("ETag", "").strip('"').lower()
                objects.append(_Object(key, rel, int(item["Size"]), etag))
        if not objects:
            raise BaseModelUnavailable(
                model, url, "the prefix is empty: no objects under it (is the path right?)"
            )
        if sums_key is None:
            return objects, None
        text = client.get_object(Bucket=bucket, Key=sums_key)["Body"].read().decode()
    except (ClientError, BotoCoreError) as exc:
        raise BaseModelUnavailable(model, url, f"cannot list or read the prefix: {exc}") from exc
    sums = _parse_sums(text, model, url)
    names = {o.rel for o in objects}
    unlisted = sorted(names - sums.keys())
    if unlisted:
        raise BaseModelUnavailable(
            model, url, f"{SUMS_FILE} does not list {len(unlisted)} file(s): {unlisted[:5]}"
        )
    missing = sorted(sums.keys() - names)
    if missing:
        raise BaseModelUnavailable(
            model,
            url,
            f"{SUMS_FILE} lists {len(missing)} file(s) not under the prefix: {missing[:5]}",
        )
    return objects, sums


def _parse_sums(text: str, model: str, url: str) -> dict[str, str]:
    """`sha256sum` output: `<hex>  <path>` (or `<hex> *<path>`), paths relative to the prefix."""
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _SUMS_LINE.match(line)
        if match is None:
            raise BaseModelUnavailable(
                model, url, f"{SUMS_FILE} line {number} is not `<sha256>  <path>`: {line[:100]!r}"
            )
        rel = match.group(2).removeprefix("./")
        sums[rel] = match.group(1).lower()
    return sums


def _check_relative(rel: str, model: str, url: str) -> None:
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[-1] in RESERVED:
        raise BaseModelUnavailable(model, url, f"object name not usable as a file: {rel!r}")


def _download(
    client: Any,
    bucket: str,
    objects: list[_Object],
    sums: dict[str, str] | None,
    staging: Path,
    model: str,
    url: str,
) -> dict[str, dict[str, Any]]:
    """Download every object into `staging`, checking each as it arrives; a few at a time.
    The first failure stops the others."""
    stop = threading.Event()

    def fetch(obj: _Object) -> tuple[str, dict[str, Any]]:
        dest = staging / obj.rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        md5 = hashlib.md5(usedforsecurity=False)
        sha = hashlib.sha256()
        size = 0
        try:
            response = client.get_object(Bucket=bucket, Key=obj.key)
            body = response["Body"]
            try:
                with dest.open("wb") as out:
                    for chunk in body.iter_chunks(CHUNK):
                        if stop.is_set():
                            raise BaseModelUnavailable(model, url, "download abandoned")
                        md5.update(chunk)
                        sha.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
            finally:
                body.close()
        except (ClientError, BotoCoreError) as exc:
            raise BaseModelUnavailable(model, url, f"cannot download {obj.rel}: {exc}") from exc
        if size != obj.size:
            raise BaseModelUnavailable(
                model, url, f"{obj.rel}: downloaded {size} bytes, but the object has {obj.size}"
            )
        # A single-part upload's ETag is its MD5, unless the object is KMS- or
        # customer-key-encrypted (then it is not, and has no '-' either).
        encrypted = response.get("SSECustomerAlgorithm") or str(
            response.get("ServerSideEncryption", "")
        ).startswith("aws:kms")
        if _PLAIN_MD5.match(obj.etag) and not encrypted and md5.hexdigest() != obj.etag:
            raise BaseModelUnavailable(
                model,
                url,
                f"checksum mismatch: {obj.rel} has MD5 {md5.hexdigest()}, its ETag says {obj.etag}",
            )
        digest = sha.hexdigest()
        if sums is not None and digest != sums[obj.rel]:
            raise BaseModelUnavailable(
                model,
                url,
                f"checksum mismatch: {obj.rel} has SHA-256 {digest}, {SUMS_FILE} says "
                f"{sums[obj.rel]}",
            )
        return obj.rel, {"size": size, "sha256": digest}

    with ThreadPoolExecutor(max_workers=min(DOWNLOAD_THREADS, len(objects))) as pool:
        futures = [pool.submit(fetch, obj) for obj in objects]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            stop.set()  # the running downloads stop at their next chunk
            for future in futures:
                future.cancel()
            failed[0].result()  # raises its exception
        return dict(future.result() for future in futures)


# --- The cache's entries -----------------------------------------------------------------


def _whole(entry: Path) -> dict | None:
    """The entry's manifest if every file it lists is there with its size, else None."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        for rel, info in manifest["files"].items():
            if (entry / rel).stat().st_size != info["size"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def _touch(entry: Path) -> None:
    marker = entry / LAST_USED
    marker.touch()
    now = time.time_ns()
    os.utime(marker, ns=(now, now))


def _last_used(entry: Path) -> int:
    for name in (LAST_USED, MANIFEST):
        with contextlib.suppress(OSError):
            return (entry / name).stat().st_mtime_ns
    return 0


def _discard(entry: Path, cache: Path) -> None:
    """Remove an entry: renamed out of sight first, so no one sees it half deleted."""
    trash = Path(tempfile.mkdtemp(prefix=f"{entry.name}.evicted.", dir=cache / ".staging"))
    os.rename(entry, trash / entry.name)
    shutil.rmtree(trash, ignore_errors=True)


def _evict(cache: Path, need: int, bound: int, keep: str) -> None:
    """Evict least recently used entries (not `keep`, none in use) until `need` more bytes
    fit under `bound`. Called with the cache lock held."""
    entries = []
    for path in cache.iterdir():
        if path.name.startswith(".") or path.name == keep or not path.is_dir():
            continue
        manifest = _whole(path)
        if manifest is None:
            if (path / MANIFEST).exists():  # ours, but damaged: nobody can use it
                _discard(path, cache)
            continue  # not ours: left alone and not counted
        entries.append((_last_used(path), path, int(manifest.get("total_bytes", 0))))
    used = sum(size for _, _, size in entries)
    for _, path, size in sorted(entries, key=lambda e: e[0]):
        if used + need <= bound:
            return
        if _evict_unused(path, cache):
            log.info("evicted base model %s from the model cache (%d bytes)", path.name, size)
            used -= size
        else:
            log.info("base model %s is in use; not evicting it", path.name)
    if used + need > bound:
        log.warning(
            "model cache %s goes over its bound (%d + %d > %d bytes): the other models are in use",
            cache,
            used,
            need,
            bound,
        )


def _evict_unused(entry: Path, cache: Path) -> bool:
    pin = cache / ".pins" / entry.name
    with pin.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # some process holds it pinned
        _discard(entry, cache)
        return True  # closing the handle releases the lock


@contextlib.contextmanager
def _cache_lock(cache: Path, model: str) -> Iterator[None]:
    with (cache / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process using the model cache (for %s)", model)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the handle releases the lock


# This process's pins: the pin file path -> an open handle holding a shared lock on it.
_pins: dict[Path, Any] = {}
_pins_lock = threading.Lock()


def _keep_pin(pin: Path | None) -> None:
    """Hold a shared lock on `pin` (blocking while an eviction of it finishes), and release
    this process's other pins: a process uses one base model at a time."""
    with _pins_lock:
        for other in [p for p in _pins if p != pin]:
            _pins.pop(other).close()
        if pin is not None and pin not in _pins:
            handle = pin.open("a")
            fcntl.flock(handle, fcntl.LOCK_SH)
            _pins[pin] = handle
