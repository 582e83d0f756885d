"""A production-shaped deployment for end-to-end tests: the API (with its scheduler thread)
under uvicorn, two separate `lathe worker` processes of different GPU classes, Postgres,
Redis and moto's S3 server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.lifetime import child_env
from tests.conftest import serve_in_thread, wait_for  # noqa: F401 (wait_for re-exported)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SMALL, LARGE = "cpu-small", "cpu-large"
WORKERS = {SMALL: ("small@e2e", 0.6), LARGE: ("large@e2e", 4.0)}  # class: (id, GB)


@pytest.fixture(scope="session")
def e2e_env(stack_env: dict[str, str]) -> dict[str, str]:
    """The stack, with a pool made only of the workers below and quick heartbeats."""
    return {
        **stack_env,
        "LATHE_GPU_CLASSES": "{}",
        "LATHE_HEARTBEAT_SECONDS": "0.5",
        "LATHE_WORKER_LEASE_SECONDS": "20",
        "LATHE_SCHEDULER_INTERVAL_SECONDS": "0.2",
    }


@pytest.fixture(scope="session")
def live_api(e2e_env: dict[str, str]) -> Iterator[str]:
    """Base URL of the API served by uvicorn in a thread; it runs the scheduler too."""
    with serve_in_thread(e2e_env) as url:
        yield url


def start_worker(
    env: dict[str, str], gpu_class: str, name: str, memory_gb: float, log_path: Path
) -> subprocess.Popen:
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "worker",
            "--gpu-class",
            gpu_class,
            "--memory-gb",
            str(memory_gb),
            "--name",
            name,
        ],
        env=child_env({**os.environ, **env}),  # it dies with pytest, even a killed one
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return proc


def wait_ready(proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 90
    while b" ready." not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the worker did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


def stop_worker(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


class KillableWorker:
    """A `lathe worker` of `gpu_class` announcing `gpus` devices, in a session of its own,
    so its whole tree (pool, job process, ranks) can be killed at once, as a node failure
    would. It dies with pytest, even a killed one (child_env)."""

    def __init__(
        self, env: dict[str, str], name: str, log_dir: Path, gpu_class: str, gpus: int = 1
    ) -> None:
        self.log_path = log_dir / f"{name}.log"
        command = [sys.executable, "-m", "app.cli", "worker", "--gpu-class", gpu_class]
        command += ["--memory-gb", "4", "--name", name]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                command,
                env=child_env({**os.environ, **env, "LATHE_WORKER_GPUS": str(gpus)}),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_ready(self.proc, self.log_path)

    def kill_tree(self) -> None:
        """What a node failure looks like: the worker, its pool and its training process."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="session")
def workers(
    e2e_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Two real `lathe worker` processes, one per class: {class: worker id}."""
    logs = tmp_path_factory.mktemp("workers")
    procs = {}
    for gpu_class, (name, memory) in WORKERS.items():
        log_path = logs / f"{gpu_class}.log"
        procs[gpu_class] = (start_worker(e2e_env, gpu_class, name, memory, log_path), log_path)
    for proc, log_path in procs.values():
        wait_ready(proc, log_path)
    yield {gpu_class: name for gpu_class, (name, _) in WORKERS.items()}
    for proc, _ in procs.values():
        stop_worker(proc)
    if os.environ.get("LATHE_TEST_SHOW_WORKER_LOG"):
        for _, log_path in procs.values():
            print(log_path.read_text())


DATA = Path(__file__).resolve().parents[2] / "app" / "data"


def team_client(base_url: str, key: str) -> httpx.Client:
    """An HTTP client for the API at `base_url`, authenticated with a team key."""
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def upload(api, name: str = "sample_chat_valid.jsonl") -> str:
    """Upload one of the bundled sample datasets; its file id."""
    with (DATA / name).open("rb") as fh:
        resp = api.post(
            "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", fh)}
        )
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def submit(api, file_id: str, n_epochs: int = 1, **extra) -> str:
    """Create a small tiny-random-llama job (batch 2, 128 tokens); its id."""
    resp = api.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny-random-llama",
            "training_file": file_id,
            "hyperparameters": {"n_epochs": n_epochs, "batch_size": 2},
            "max_seq_length": 128,
            **extra,
        },
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium, headless, driven by Playwright: the dashboard's browser tests."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"Debian's Chromium is not installed at {CHROMIUM}: the dashboard tests drive it "
            "with Playwright. `make system-deps` installs it (as root) or prints the command."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


def save_screenshot(page, tmp_path: Path, name: str) -> None:
    """A full-page PNG of `page` under the test's tmp dir, and into $LATHE_SCREENSHOT_DIR
    when set (the README's docs/images/ come from there)."""
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("LATHE_SCREENSHOT_DIR"):
        target = Path(os.environ["LATHE_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target / name)
