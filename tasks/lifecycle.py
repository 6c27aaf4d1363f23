"""The life of a run's driver process: who owns a workdir, what happens on a signal, and what is
cleaned up when the driver dies, however it dies.

- **One workdir, one pipeline.** `workdir_lock` holds an exclusive `flock` on `<workdir>/r1.lock`
  for as long as a run lives (re-entrant within the process: the CLI takes it, the flows take it
  again, a deployment's flow-run process takes it itself). The kernel drops the lock when its
  holder dies, even by SIGKILL, so a dead owner's lock is taken over; the file says who held it
  (host, pid, start time, command), which a refusal names.
- **Owners.** `owner()` is this process as runs record it (host, pid, the pid's start time, so
  that a recycled pid is not taken for the owner); `owner_alive` says whether it still runs.
- **Signals.** `handle_signals` turns SIGTERM into `Terminated` (a KeyboardInterrupt) in the main
  thread, as SIGINT already is; `interrupted()` says which one arrived, since Ray Train turns the
  interrupt into a SystemExit on its way out. The CLI exits 143 / 130.
- **Nothing outlives the driver.** `start_watchdog` runs a small process in its own session that
  records the driver's descendants (Prefect's API server, the local Ray, sandbox workers) every
  half second and kills whatever of them is left once the driver is gone.

Hand-written: Prefect, Ray and MLflow each clean up after a graceful exit of their own, but none
owns the driver's lifetime as a whole, and `PR_SET_PDEATHSIG` covers only direct children started
with it (Prefect and Ray start theirs themselves).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

LOCK_FILE = "r1.lock"


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir: the message names it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


# ------------------------------------------------------------------------------------- owners
def _pid_start(pid: int) -> str | None:
    """The pid's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def owner() -> dict[str, str]:
    """This process as the owner of a run or lock."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "pid_start": _pid_start(os.getpid()) or "",
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def owner_alive(who: dict[str, str]) -> bool | None:
    """Whether the owner `who` still runs: None when it is on another host (not knowable here)."""
    if who.get("host") != socket.gethostname():
        return None
    try:
        pid = int(who.get("pid", ""))
    except ValueError:
        return False
    start = _pid_start(pid)
    return start is not None and (not who.get("pid_start") or start == who["pid_start"])


# --------------------------------------------------------------------------------------- lock
_held: dict[str, tuple[int, int]] = {}  # workdir -> (fd, depth)
_held_lock = threading.Lock()


@contextlib.contextmanager
def workdir_lock(workdir: str | Path, command: str = ""):
    """Hold `<workdir>/r1.lock` exclusively; raise `WorkdirBusy` naming the holder if another
    live process has it. Re-entrant in this process."""
    key = str(Path(workdir).resolve())
    with _held_lock:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
        else:
            _held[key] = (_acquire(Path(key), command), 1)
    try:
        yield
    finally:
        with _held_lock:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                os.close(fd)  # releases the flock


def _acquire(workdir: Path, command: str) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise WorkdirBusy(
            f"workdir '{workdir}' is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
            f"{holder.get('started', '?')} ({holder.get('command', 'r1')}); wait for it to finish or stop it, "
            "or use another runtime.workdir") from None
    previous = _read_holder(fd)
    if previous and owner_alive(previous) is False:
        print(f"r1: taking over the lock of '{workdir}' from pid {previous.get('pid')} (no longer running)",
              file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({**owner(), "command": command or " ".join(sys.argv)}).encode(), 0)
    return fd


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:
        return {}


# ------------------------------------------------------------------------------------ signals
_received: list[int] = []
_handlers: list = []  # the active handle_signals handlers, innermost last


@contextlib.contextmanager
def handle_signals():
    """While inside: SIGTERM raises `Terminated` in the main thread (SIGINT keeps raising
    KeyboardInterrupt); both are remembered for `interrupted`. A second signal exits at once."""

    def on_signal(signum, frame):
        if _received:
            os._exit(128 + signum)
        _received.append(signum)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    _handlers.append(on_signal)
    try:
        yield
    finally:
        _handlers.remove(on_signal)
        for s, handler in previous.items():
            signal.signal(s, handler)


def reclaim_signals() -> None:
    """Put this module's handlers back after a library replaced them: `ray.init` installs a
    SIGTERM handler in the driver that tears the local node down and calls `sys.exit(1)` from
    wherever the main thread is, which ends in SIGABRT at interpreter exit and records nothing."""
    if _handlers and threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, _handlers[-1])


def interrupted() -> int | None:
    """The signal (SIGTERM or SIGINT) this process was stopped by, if any."""
    return _received[0] if _received else None


def exit_code(signum: int) -> int:
    return 128 + signum


def ending_status(error: BaseException) -> str:
    """How a run that ends with `error` is recorded: KILLED when a signal stopped it (Ray Train
    re-raises the interrupt as SystemExit), else FAILED."""
    return "KILLED" if isinstance(error, KeyboardInterrupt) or interrupted() is not None else "FAILED"


# ----------------------------------------------------------------------------------- watchdog
def start_watchdog() -> subprocess.Popen:
    """A process in its own session that kills this process's descendants once it is gone."""
    return subprocess.Popen([sys.executable, "-m", "tasks.lifecycle", str(os.getpid()), _pid_start(os.getpid()) or ""],
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(root: int) -> dict[int, str]:
    tree, found, todo = _children(), {}, [root]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found and child != os.getpid():
                found[child] = _pid_start(child) or ""
                todo.append(child)
    return found


def watch(driver: int, driver_start: str, poll_s: float = 0.5) -> None:
    """Until `driver` ends, record its descendants; then SIGKILL the recorded ones still running
    (the same process: same start time) and their own descendants."""
    seen: dict[int, str] = {}
    while _pid_start(driver) == driver_start or (not driver_start and _pid_start(driver)):
        seen.update(_descendants(driver))
        time.sleep(poll_s)
    for _ in range(3):  # what a dying process starts while we kill is caught by the next pass
        alive = {pid: start for pid, start in seen.items() if start and _pid_start(pid) == start}
        for pid in list(alive):
            alive.update(_descendants(pid))
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if not alive:
            return
        seen = alive
        time.sleep(0.2)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
