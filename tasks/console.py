"""What `r1 run` shows on the terminal, and where everything else goes.

Quiet by default: the driver's own stdout and stderr (Prefect's console logs, Ray's forwarded
worker output, transformers' and Ray's progress bars, warnings of any library, C-level writes
too) are redirected to `<run dir>/logs/driver-<time>.log`, and the terminal gets only what is
written here: one progress line per stage (rewritten in place on a terminal, at most one line
per `interval_s` otherwise: the stage's summary line follows its last step), each stage's summary, the final table and the log's path. With
`-v` everything goes to both. Nothing is attached in a process that did not call `attach` (a
deployment's worker, a test calling a flow): `say` and `progress` then do nothing, since the
Prefect logs already hold the same lines.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

_lock = threading.Lock()


class Console:
    def __init__(self, stream, log_path: Path, interval_s: float):
        self.stream, self.log_path, self.interval_s = stream, log_path, interval_s
        self.tty = stream.isatty()
        self.shown_at: dict[str, float] = {}
        self.open_line = False  # a progress line on a terminal, not ended yet

    def write(self, text: str, *, in_place: bool = False) -> None:
        if self.tty and self.open_line:
            self.stream.write("\r\033[K")
        self.stream.write(text if in_place and self.tty else text + "\n")
        self.open_line = in_place and self.tty
        self.stream.flush()


_attached: list[Console] = []  # the Console of this process, when attached


def say(text: str) -> None:
    """A line for the operator (also in the log)."""
    with _lock:
        if _attached:
            _attached[0].write(text)
        print(text, flush=True)  # the log (or, unattached, the console as before)


def progress(stage: str, step: int, total: int | None, line: str, headline: str) -> None:
    """A stage's step, from the workers' reports: in place on a terminal; otherwise the first and
    then at most one per `interval_s` (not the last: the stage's summary line says it is done)."""
    with _lock:
        if not _attached:
            return
        shown = _attached[0]
        text = f"  {stage:<28} {line}  {headline}".rstrip()
        last = total is not None and step >= total
        now = time.monotonic()
        if shown.tty:
            shown.write(text, in_place=not last)
        elif not last and now - shown.shown_at.get(stage, -1e9) >= shown.interval_s:
            shown.write(text)
            shown.shown_at[stage] = now


@contextlib.contextmanager
def attach(log_dir: Path, verbose: bool = False, interval_s: float = 120.0):
    """Send this process's fds 1 and 2 to a new log file under `log_dir` (and, `verbose`, to the
    terminal too) for the duration; yield the log's path."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"driver-{time.strftime('%Y%m%d-%H%M%S')}.log"
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    tee = None
    if verbose:  # a pipe read by a thread that writes both
        read_fd, write_fd = os.pipe()
        tee = threading.Thread(target=_tee, args=(read_fd, log_fd, saved[0]), daemon=True, name="r1-log-tee")
        tee.start()
        target = write_fd
    else:
        target = log_fd
    os.dup2(target, 1), os.dup2(target, 2)
    with _lock:
        if not verbose:
            _attached[:] = [Console(terminal, log_path, interval_s)]
    terminal.write(f"r1: logs of this run: {log_path}\n")
    terminal.flush()
    try:
        yield log_path
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        with _lock:
            _attached.clear()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        if tee is not None:
            os.close(target)
            tee.join(timeout=5)
        os.close(log_fd)
        for fd in saved:
            os.close(fd)
        terminal.write(f"r1: logs of this run: {log_path}\n")
        terminal.close()


def _tee(read_fd: int, log_fd: int, terminal_fd: int) -> None:
    with contextlib.suppress(OSError):
        while chunk := os.read(read_fd, 65536):
            os.write(log_fd, chunk)
            os.write(terminal_fd, chunk)
    os.close(read_fd)


def link_ray_logs(log_dir: Path) -> None:
    """`logs/ray` -> the local Ray session's logs (every worker's and Ray's own processes')."""
    import ray

    if not ray.is_initialized():
        return
    with contextlib.suppress(Exception):
        session = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        link = log_dir / "ray"
        if session.is_dir() and not link.exists():
            link.symlink_to(session, target_is_directory=True)
