"""worker.model_cache: base models from a local directory, an S3 prefix cached on the host
(on the session's moto S3 server), or the local Hugging Face cache. No torch needed."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from app.config import TINY_RANDOM_LLAMA, BaseModelSpec, Settings
from worker import model_cache
from worker.model_cache import MANIFEST, BaseModelUnavailable, entry_name, resolve_base_model

ROOT = Path(__file__).resolve().parents[2]
GB = 10**9


@pytest.fixture(autouse=True)
def _release_pins() -> Iterator[None]:
    yield
    model_cache._keep_pin(None)  # this process's pins must not outlive the test's cache


@pytest.fixture
def s3(s3_endpoint: str):
    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def gets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Keys of every GetObject the model cache sends."""
    seen: list[str] = []
    real = model_cache._s3_client

    def client(settings: Settings):
        c = real(settings)
        c.meta.events.register(
            "provide-client-params.s3.GetObject",
            lambda params, **_: seen.append(params["Key"]),
        )
        return c

    monkeypatch.setattr(model_cache, "_s3_client", client)
    return seen


def settings_for(tmp_path: Path, s3_endpoint: str, max_bytes: int = 10**6) -> Settings:
    return Settings(
        home=tmp_path / "home",
        s3_endpoint_url=s3_endpoint,
        model_cache_dir=tmp_path / "cache",
        model_cache_max_gb=max_bytes / GB,
    )


def publish(s3, bucket: str, prefix: str, files: dict[str, bytes], sums: str | None = None) -> str:
    """Upload a model's files under `prefix`; `sums` is the SHA256SUMS text ("auto": right)."""
    for rel, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)
    if sums == "auto":
        sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {rel}\n" for rel, d in files.items())
    if sums is not None:
        s3.put_object(Bucket=bucket, Key=f"{prefix}/SHA256SUMS", Body=sums.encode())
    return f"s3://{bucket}/{prefix}"


def model_files(size: int = 1000, tag: bytes = b"x") -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": (tag * size)[:size],
        "tokenizer/tokenizer.json": b"{}",
    }


def entries(settings: Settings) -> list[str]:
    cache = settings.resolved_model_cache_dir
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


def test_an_s3_model_is_downloaded_once_then_reused(
    tmp_path: Path, s3_endpoint: str, s3, s3_bucket: str, gets: list[str]
) -> None:
    files = model_files()
    url = publish(s3, s3_bucket, "models/llama", files, sums="auto")
    s3.put_object(Bucket=s3_bucket, Key="models/llama/tokenizer/", Body=b"")  # a dir marker
    s3.put_object(Bucket=s3_bucket, Key="models/llama-2/config.json", Body=b"{}")  # not ours
    settings = settings_for(tmp_path, s3_endpoint)
    base = BaseModelSpec(name="llama", path=url)

    path = resolve_base_model(base, settings)

    assert path == settings.resolved_model_cache_dir / entry_name(url)
    for rel, data in files.items():
        assert (path / rel).read_bytes() == data
    assert not (path / "SHA256SUMS").exists()
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["source"] == url and manifest["checked_against_sha256sums"]
    assert manifest["files"] == {
        rel: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for rel, d in files.items()
    }
    assert sorted(gets) == sorted(
        [f"models/llama/{r}" for r in files] + ["models/llama/SHA256SUMS"]
    )
    marker = path / model_cache.LAST_USED
    first_use = marker.stat().st_mtime_ns

    gets.clear()
    assert resolve_base_model(base, settings) == path
    assert gets == []  # nothing downloaded again, nothing asked of S3
    assert marker.stat().st_mtime_ns > first_use
    assert entries(settings) == [path.name]


def test_a_damaged_cached_model_is_downloaded_again(
    tmp_path: Path, s3_endpoint: str, s3, s3_bucket: str, gets: list[str]
) -> None:
    url = publish(s3, s3_bucket, "m", model_files())
    settings = settings_for(tmp_path, s3_endpoint)
    base = BaseModelSpec(name="m", path=url)
    path = resolve_base_model(base, settings)
    (path / "model.safetensors").write_bytes(b"truncated")
    gets.clear()

    assert resolve_base_model(base, settings) == path
    assert (path / "model.safetensors").read_bytes() == model_files()["model.safetensors"]
    assert len(gets) == 3


def test_a_wrong_sha256sums_fails_and_leaves_nothing_in_the_cache(
    tmp_path: Path, s3_endpoint: str, s3, s3_bucket: str
) -> None:
    files = model_files()
    sums = "".join(f"{hashlib.sha256(d).hexdigest()}  ./{rel}\n" for rel, d in files.items())
    sums = sums.replace(hashlib.sha256(files["model.safetensors"]).hexdigest(), "0" * 64)
    url = publish(s3, s3_bucket, "bad", files, sums=sums)
    settings = settings_for(tmp_path, s3_endpoint)

    with pytest.raises(BaseModelUnavailable) as info:
        resolve_base_model(BaseModelSpec(name="bad-model", path=url), settings)

    message = str(info.value)
    assert "'bad-model'" in message and url in message
    assert "checksum mismatch: model.safetensors" in message and "SHA256SUMS says 000" in message
    assert entries(settings) == []
    assert list((settings.resolved_model_cache_dir / ".staging").iterdir()) == []


def test_a_file_missing_from_sha256sums_is_refused(
    tmp_path: Path, s3_endpoint: str, s3, s3_bucket: str
) -> None:
    files = model_files()
    sums = f"{hashlib.sha256(files['config.json']).hexdigest()}  config.json\n"
    url = publish(s3, s3_bucket, "partial", files, sums=sums)
    with pytest.raises(BaseModelUnavailable, match="SHA256SUMS does not list 2 file"):
        resolve_base_model(BaseModelSpec(name="p", path=url), settings_for(tmp_path, s3_endpoint))


def test_an_md5_etag_mismatch_fails(
    tmp_path: Path, s3_endpoint: str, s3, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = publish(s3, s3_bucket, "etag", model_files())
    real = model_cache._s3_client

    def client(settings: Settings):  # the listing reports a wrong MD5 for one object
        c = real(settings)

        def corrupt(parsed, **_):
            for item in parsed.get("Contents", []):
                if item["Key"].endswith("model.safetensors"):
                    item["ETag"] = '"' + "0" * 32 + '"'

        c.meta.events.register("after-call.s3.ListObjectsV2", corrupt)
        return c

    monkeypatch.setattr(model_cache, "_s3_client", client)
    settings = settings_for(tmp_path, s3_endpoint)
    with pytest.raises(BaseModelUnavailable, match="model.safetensors has MD5 .* ETag says 000"):
        resolve_base_model(BaseModelSpec(name="e", path=url), settings)
    assert entries(settings) == []


def test_an_empty_prefix_is_a_clear_error(
    tmp_path: Path, s3_endpoint: str, s3, s3_bucket: str
) -> None:
    s3.put_object(Bucket=s3_bucket, Key="empty/", Body=b"")  # only a directory marker
    url = f"s3://{s3_bucket}/empty"
    with pytest.raises(BaseModelUnavailable) as info:
        resolve_base_model(BaseModelSpec(name="e", path=url), settings_for(tmp_path, s3_endpoint))
    assert "'e'" in str(info.value) and url in str(info.value)
    assert "the prefix is empty" in str(info.value)


def test_least_recently_used_models_are_evicted(
    tmp_path: Path, s3_endpoint: str, s3, s3_bucket: str
) -> None:
    urls = {name: publish(s3, s3_bucket, name, model_files(tag=name.encode())) for name in "abc"}
    size = sum(len(d) for d in model_files().values())
    settings = settings_for(tmp_path, s3_endpoint, max_bytes=2 * size + size // 2)
    specs = {name: BaseModelSpec(name=name, path=url) for name, url in urls.items()}

    for name in "aba":  # b is now the least recently used
        resolve_base_model(specs[name], settings)
    resolve_base_model(specs["c"], settings)

    assert entries(settings) == sorted([entry_name(urls["a"]), entry_name(urls["c"])])


def test_a_model_in_use_by_another_process_is_not_evicted(
    tmp_path: Path, s3_endpoint: str, s3, s3_bucket: str
) -> None:
    urls = {name: publish(s3, s3_bucket, name, model_files(tag=name.encode())) for name in "abc"}
    size = sum(len(d) for d in model_files().values())
    settings = settings_for(tmp_path, s3_endpoint, max_bytes=2 * size + size // 2)
    for name in "ab":  # a is the least recently used
        resolve_base_model(BaseModelSpec(name=name, path=urls[name]), settings)
    pins = settings.resolved_model_cache_dir / ".pins"
    with (pins / entry_name(urls["a"])).open("a") as other_process:
        fcntl.flock(other_process, fcntl.LOCK_SH)  # what a job training on `a` holds
        resolve_base_model(BaseModelSpec(name="c", path=urls["c"]), settings)

    assert entries(settings) == sorted([entry_name(urls["a"]), entry_name(urls["c"])])


def test_a_model_bigger_than_the_whole_cache_is_refused(
    tmp_path: Path, s3_endpoint: str, s3, s3_bucket: str, gets: list[str]
) -> None:
    url = publish(s3, s3_bucket, "huge", model_files(size=2000))
    settings = settings_for(tmp_path, s3_endpoint, max_bytes=1000)
    with pytest.raises(BaseModelUnavailable) as info:
        resolve_base_model(BaseModelSpec(name="huge", path=url), settings)
    assert "'huge'" in str(info.value) and url in str(info.value)
    assert "LATHE_MODEL_CACHE_MAX_GB" in str(info.value)
    assert gets == [] and entries(settings) == []


def test_concurrent_resolvers_download_once(
    tmp_path: Path,
    s3_endpoint: str,
    s3,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    url = publish(s3, s3_bucket, "shared", model_files())
    seen: list[str] = []
    real = model_cache._s3_client
    second_waiting = threading.Event()

    class WaitSeen(logging.Handler):  # the second resolver says so when the lock blocks it
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for another process" in record.getMessage():
                second_waiting.set()

    handler = WaitSeen(level=logging.INFO)
    model_cache.log.addHandler(handler)
    level = model_cache.log.level
    model_cache.log.setLevel(logging.INFO)  # setLevel: it also clears the logger's cache
    request.addfinalizer(lambda: model_cache.log.setLevel(level))
    request.addfinalizer(lambda: model_cache.log.removeHandler(handler))

    def client(settings: Settings):  # the first download holds until the second waits
        c = real(settings)

        def hold(params, **_):
            seen.append(params["Key"])
            assert second_waiting.wait(10), "the second resolver never waited for the lock"

        c.meta.events.register("provide-client-params.s3.GetObject", hold)
        return c

    monkeypatch.setattr(model_cache, "_s3_client", client)
    settings = settings_for(tmp_path, s3_endpoint)
    base = BaseModelSpec(name="shared", path=url)
    start = threading.Barrier(2)
    results: list[Path | BaseException] = []

    def resolve() -> None:
        start.wait()
        try:
            results.append(resolve_base_model(base, settings))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    expected = settings.resolved_model_cache_dir / entry_name(url)
    assert results == [expected, expected]
    assert second_waiting.is_set(), "the two resolvers overlapped"
    assert sorted(seen) == sorted(f"shared/{rel}" for rel in model_files())


# --- The Hugging Face cache -------------------------------------------------------------


def fake_hf_cache(hub: Path, repo_id: str) -> Path:
    """The layout `hf download` leaves: models--org--name/{refs/main, snapshots/REV/...}."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (snapshot / "model.safetensors").write_bytes(b"weights")
    return snapshot


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: never the network
    return home


def test_a_hub_id_resolves_from_the_hf_cache(tmp_path: Path, hf_home: Path) -> None:
    snapshot = fake_hf_cache(hf_home / "hub", "acme/llama-7b")
    path = resolve_base_model(BaseModelSpec(name="llama", path="acme/llama-7b"), Settings())
    assert path.resolve() == snapshot.resolve()


def test_hf_hub_cache_wins_over_hf_home(
    tmp_path: Path, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = fake_hf_cache(tmp_path / "elsewhere", "acme/llama-7b")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    path = resolve_base_model(BaseModelSpec(name="llama", path="acme/llama-7b"), Settings())
    assert path.resolve() == snapshot.resolve()


def test_a_hub_id_missing_from_the_cache_is_a_clear_error(hf_home: Path) -> None:
    fake_hf_cache(hf_home / "hub", "acme/other")
    with pytest.raises(BaseModelUnavailable) as info:
        resolve_base_model(BaseModelSpec(name="llama", path="acme/missing"), Settings())
    message = str(info.value)
    assert "'llama'" in message and "acme/missing" in message
    assert "hf download acme/missing" in message
    assert str(hf_home / "hub") in message


# --- Local directories and the generated tiny model ----------------------------------------


def test_a_local_directory_is_used_in_place(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    base = BaseModelSpec(name="m", path=str(tmp_path / "m"))
    assert resolve_base_model(base, Settings(home=tmp_path)) == tmp_path / "m"


def test_a_missing_local_directory_is_a_clear_error(tmp_path: Path) -> None:
    base = BaseModelSpec(name="m", path=str(tmp_path / "nowhere"))
    with pytest.raises(BaseModelUnavailable, match="'m' from .*nowhere: no such local directory"):
        resolve_base_model(base, Settings(home=tmp_path))


def test_tiny_random_llama_is_generated_into_models_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    fake = types.ModuleType("worker.training.tiny_model")  # the real one imports torch
    fake.ensure_tiny_random_llama = lambda path, template: calls.append((path, template)) or path
    monkeypatch.setitem(sys.modules, "worker.training.tiny_model", fake)
    settings = Settings(home=tmp_path)
    base = settings.base_model(TINY_RANDOM_LLAMA)

    assert resolve_base_model(base, settings) == settings.models_dir / TINY_RANDOM_LLAMA
    assert calls == [(settings.models_dir / TINY_RANDOM_LLAMA, base.chat_template)]


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import sys, worker.model_cache; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)
