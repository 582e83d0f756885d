"""app/lifetime.py on real processes: a watched child ends when its parent is SIGKILLed,
by the kernel's death signal or by the portable getppid watch alone; one that ignores its
signal is SIGKILLed after the grace period; `stop_child` leaves nothing of the group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.lifetime import PARENT_PID_ENV, child_env, stop_child

ROOT = Path(__file__).resolve().parents[2]


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"  # dead, waiting for whoever adopted it to reap it


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def child_code(ready: Path, kernel: bool, ignore: bool = False, grace_s: float = 10) -> str:
    """A watched child: writes `ready` once watching, then waits to be ended."""
    return "\n".join(
        [
            "import signal, time",
            "from pathlib import Path",
            "from app import lifetime",
            *([] if kernel else ["lifetime._set_pdeathsig = lambda sig: False"]),
            *(["signal.signal(signal.SIGTERM, signal.SIG_IGN)"] if ignore else []),
            f"lifetime.die_with_parent(signal.SIGTERM, grace_s={grace_s}, poll_s=0.05)",
            f"Path({str(ready)!r}).write_text('watching')",
            "time.sleep(120)",
        ]
    )


def start_parent_of(code: str) -> tuple[subprocess.Popen, int]:
    """A parent process that starts the child with child_env() and then just waits."""
    parent_code = (
        "import subprocess, sys, time\n"
        "from app.lifetime import child_env\n"
        f"child = subprocess.Popen([sys.executable, '-c', {code!r}], env=child_env())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    return parent, int(parent.stdout.readline())


def wait_file(path: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("kernel", [True, False], ids=["pdeathsig", "getppid-watch"])
def test_a_watched_child_ends_when_its_parent_is_killed(tmp_path: Path, kernel: bool) -> None:
    ready = tmp_path / "ready"
    parent, child = start_parent_of(child_code(ready, kernel))
    try:
        wait_file(ready)
        assert not gone(child)
        parent.kill()
        parent.wait()
        assert wait_gone(child, 5), "the child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        if not gone(child):
            os.kill(child, signal.SIGKILL)


def test_a_child_that_ignores_its_signal_is_killed_after_the_grace_period(
    tmp_path: Path,
) -> None:
    ready = tmp_path / "ready"
    code = child_code(ready, kernel=True, ignore=True, grace_s=0.5)
    parent, child = start_parent_of(code)
    try:
        wait_file(ready)
        parent.kill()
        parent.wait()
        assert wait_gone(child, 5)
    finally:
        parent.kill()
        if not gone(child):
            os.kill(child, signal.SIGKILL)


def test_a_parent_dead_before_the_watch_began_is_noticed(tmp_path: Path) -> None:
    """LATHE_PARENT_PID names a process that is no longer this one's parent."""
    ready = tmp_path / "ready"
    env = {**os.environ, PARENT_PID_ENV: "1"}  # our parent is pytest, not init
    proc = subprocess.Popen(
        [sys.executable, "-c", child_code(ready, kernel=True)], cwd=ROOT, env=env
    )
    try:
        # Its SIGTERM, on the stand-in handler die_with_parent installs (a quiet exit).
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        proc.kill()


def test_stop_child_ends_the_child_s_whole_process_group(tmp_path: Path) -> None:
    """A child that ignores the signal, with a grandchild that does too."""
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "g = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)'])\n"
        "print(g.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    grandchild = int(proc.stdout.readline())
    try:
        started = time.monotonic()
        assert stop_child(proc, signal.SIGTERM, grace_s=0.5) == -signal.SIGKILL
        assert time.monotonic() - started < 5
        assert wait_gone(grandchild, 5)
    finally:
        for pid in (proc.pid, grandchild):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_child_env_names_this_process() -> None:
    assert child_env({"A": "1"}) == {"A": "1", PARENT_PID_ENV: str(os.getpid())}
