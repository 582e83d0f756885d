"""Process lifetime: every process Lathe starts ends with the process that started it.

Lathe starts three kinds of child: `lathe serve` (embedded) runs `lathe worker`, the
worker's Celery pool process runs `python -m worker.job_process` for each job, and
`lathe demo` runs `lathe serve`. A child must not outlive its parent, whether the parent
stops cleanly or is SIGKILLed (nothing runs in a killed process, so the child has to
notice by itself):

- The parent passes its pid in LATHE_PARENT_PID (`child_env`); the child calls
  `die_with_parent` first thing. The variable is consumed there, so a grandchild never
  watches the wrong process.
- On Linux the kernel delivers a chosen signal the moment the parent dies
  (prctl PR_SET_PDEATHSIG, through billiard, as Celery does for its pool). It works while
  the child is busy in C code (torch) and needs no thread. The kernel watches the parent
  *thread* that forked the child: Lathe's spawns all happen on a main thread.
- Everywhere, a daemon thread polls os.getppid(): an orphan is re-parented (to init or a
  subreaper), so a changed parent pid means the parent is gone. It also covers what the
  death signal misses: a parent that died before the prctl call. We chose it over a pipe
  whose EOF signals the death because it needs no file descriptor carried through
  Celery's fork and the exec of the training process.
- A child that has not exited `grace_s` after its signal is SIGKILLed, with its process
  group when it leads one (the embedded worker does: its pool and training process go
  with it).

`stop_child` is the parent's side of a clean stop: a signal, a grace period, then SIGKILL
for the child's whole process group.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping

PARENT_PID_ENV = "LATHE_PARENT_PID"
log = logging.getLogger(__name__)


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that must die with this process."""
    return {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid())}


def die_with_parent(
    sig: int = signal.SIGKILL,
    *,
    parent_pid: int | None = None,
    grace_s: float = 10.0,
    poll_s: float = 0.25,
) -> int | None:
    """Deliver `sig` to this process when its parent dies (then SIGKILL after `grace_s`).

    The parent is `parent_pid`, else LATHE_PARENT_PID (consumed), else nobody: a process
    started by hand or by a supervisor is not watched. Returns the watched pid.
    """
    env_pid = os.environ.pop(PARENT_PID_ENV, None)
    parent = parent_pid or (int(env_pid) if env_pid and env_pid.isdigit() else None)
    if not parent:
        return None
    if sig != signal.SIGKILL and signal.getsignal(sig) == signal.SIG_DFL:
        # Until the program installs its own handler (Celery, uvicorn), exit quietly on
        # it: SIGQUIT's default action would dump core.
        signal.signal(sig, lambda signum, frame: os._exit(128 + signum))
    # The kernel's signal never comes if the parent died before the prctl call.
    kernel = _set_pdeathsig(sig) and os.getppid() == parent
    threading.Thread(
        target=_watch,
        args=(parent, sig, kernel, grace_s, poll_s),
        name="lathe-parent-watch",
        daemon=True,
    ).start()
    return parent


def _set_pdeathsig(sig: int) -> bool:
    try:
        from billiard.util import set_pdeathsig

        set_pdeathsig(sig)
        return True
    except (ImportError, OSError):  # not Linux: the watch thread alone
        return False


def _watch(parent: int, sig: int, kernel: bool, grace_s: float, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    if not kernel:
        log.warning("parent process %d is gone: stopping", parent)
        os.kill(os.getpid(), sig)
    time.sleep(grace_s)
    _kill_own_tree()


def _kill_own_tree() -> None:
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def stop_child(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> int:
    """Stop `proc` with `sig`; SIGKILL it after `grace_s`. When it leads a process group
    (start_new_session=True), whatever is left of the group is SIGKILLed too, before the
    leader is reaped (so the group's id cannot have been reused)."""
    leads_group = _leads_group(proc.pid)
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while not _exited(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    if leads_group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    elif not _exited(proc):
        proc.kill()
    return proc.wait()


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _exited(proc: subprocess.Popen) -> bool:
    """Exited, but not reaped: a zombie still holds its pid and its group's id."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
