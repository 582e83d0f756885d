"""The processes of one LATHE_HOME, found through /proc (their environment at exec, which
a Celery pool process shares with its worker), for the tests that check none outlives
`lathe serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def processes_of(home: Path) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process started with LATHE_HOME=home."""
    marker = f"LATHE_HOME={home}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone meanwhile, or not ours
        if state != "Z":
            found[int(entry.name)] = cmdline.strip()
    return found


def wait_for_processes(home: Path, predicate, timeout_s: float) -> dict[int, str]:
    """Poll until predicate(processes_of(home)) holds; the last listing either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = processes_of(home)
        if predicate(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def kill_all(home: Path) -> None:
    """The cleanup of a test that failed: nothing of its home may outlive it."""
    for pid in processes_of(home):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def embedded_home(home: Path, team: str) -> tuple[dict[str, str], str]:
    """(environment, team key) for an embedded Lathe in `home`: this environment without
    LATHE_ variables, the schema built and a team created by the `lathe` command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATHE_")}
    env["LATHE_HOME"] = str(home)

    def lathe(*args: str) -> str:
        command = [sys.executable, "-m", "app.cli", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout

    lathe("migrate")
    return env, lathe("admin", "create-team", team).strip().splitlines()[-1]
