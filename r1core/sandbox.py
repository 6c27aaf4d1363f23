"""Untrusted Python in a separate process with hard limits: the sandbox behind the code rewards.

A program written by the model is untrusted input. It runs in a fresh process forked by a
*sandbox worker*, never in the trainer, and the checker never runs inside it: the program
reports the values of the test calls as JSON on a pipe of its own, and the parent compares
them with expected values the program never sees (`run` returns them; `r1core/code_rewards.py`
scores them). A worker serves one program at a time; a pool of warm workers (`Sandbox`) keeps
the cost of a call to a fork instead of an interpreter start-up.

What is isolated, per program (limits from `SandboxConfig`, set by the worker before the
program's first instruction):
- time: wall clock (the worker kills the whole process group; the parent kills the worker if
  the worker itself stops answering), CPU seconds (RLIMIT_CPU);
- memory: address space (RLIMIT_AS), so a 10 GB allocation is a MemoryError;
- processes: RLIMIT_NPROC, counted per user, and every process the program left behind is
  killed after the call (see "modes");
- files: a fresh temporary working directory, file size (RLIMIT_FSIZE), open files
  (RLIMIT_NOFILE), no core dumps; stdin is empty; stdout and stderr are capped
  (`output_bytes`; the program is killed when it writes more);
- environment: a fixed, minimal environment (PATH, HOME and TMPDIR in the working directory,
  LANG); the worker is started with that environment too and imports only the standard
  library, so no variable, credential or tracking URI of the trainer reaches the program,
  neither through `os.environ` nor through `/proc/<pid>/environ` of its parent.

Modes (chosen once per process by probing `unshare`; the mode is logged and in `Sandbox.mode`):
- `namespaced` (where the OS permits user or root namespaces): each worker runs as PID 1 of its
  own PID, network and mount namespaces. There is no network but a loopback that is down (no
  connection to 127.0.0.1 nor outside); /tmp, /var/tmp, /dev/shm and the home directory are
  private empty tmpfs mounts, and every other mount is read-only, so nothing outside the working
  directory can be written or deleted; after each call the worker kills every other process of
  its namespace (`kill(-1)` from PID 1), which catches children that left the process group,
  and when the worker dies the kernel kills the whole namespace. Run as root, the program also
  drops to an unprivileged user (`uid`, default nobody), which makes RLIMIT_NPROC bite.
- `process-group` (fallback): the program runs in its own session; stray processes are found by
  parentage (the worker is a child subreaper) and killed after each call. There is NO network
  isolation and NO file-system isolation beyond the user's permissions in this mode: the log line
  says so, and `SandboxConfig.require_isolation` turns it into an error instead.

Not isolated in either mode: CPU time is limited but not shared fairly with the trainer (a
program can use its CPU seconds on any core); the program can read files its user can read; it
runs the same Python as the trainer (without site-packages or the project on its path, but
`ctypes` works) -- contained by the limits above, not by a language-level jail.

This file is also the worker program: `python -I -S sandbox.py --serve CONFIG_JSON` (standard
library only, on purpose).
"""
from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

# Imported by the worker before any program runs: a program is forked from the worker, so these
# work even where the unprivileged user cannot read the interpreter's files (e.g. under /root).
PRELOADED = ("math", "cmath", "itertools", "functools", "collections", "heapq", "bisect", "re", "string",
             "random", "fractions", "decimal", "statistics", "operator", "typing", "copy", "array", "socket",
             "encodings.idna")
STATUSES = ("ok", "error", "timeout", "killed", "output_limit", "unavailable")
_HEADER = struct.Struct("!I")
_CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class Result:
    """One program's run. `values`: the JSON values of the test calls, in order, as far as the
    program got (a value it could not serialise is the string "<unserialisable TYPE>")."""

    status: str  # one of STATUSES
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    values: list = field(default_factory=list)
    wall_s: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ------------------------------------------------------------------------------ the program's side
def _run_program(source: str, calls: list[str]) -> None:
    """In the forked, limited child: run the program as __main__, then each test call, writing
    one JSON line per call to fd 3. Everything here is reachable (and patchable) by the program;
    nothing here decides pass or fail."""
    # taken before the program runs, so that patching builtins, json or os does not reach them
    dumps, write, evaluate, compile_, exit_ = json.dumps, os.write, eval, compile, os._exit
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile_(source, "<program>", "exec"), namespace)
        for call in calls:
            try:  # a test call that raises fails that test only
                value = evaluate(compile_(call, "<test>", "eval"), namespace)
            except Exception as exc:  # noqa: BLE001
                value = {"<raised>": type(exc).__name__}
            try:
                line = dumps(value)
            except (TypeError, ValueError, RecursionError):
                line = dumps({"<unserialisable>": type(value).__name__})
            write(3, (line + "\n").encode())
        sys.stdout.flush()
    except SystemExit as exc:
        exit_(exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1))
    except BaseException:  # noqa: BLE001 - the program's own failure: report and exit non-zero
        traceback.print_exc(limit=5)
        exit_(1)
    exit_(0)


def _limit(config: dict) -> None:
    import resource

    def cap(which, soft, hard=None):
        resource.setrlimit(which, (soft, soft if hard is None else hard))

    cap(resource.RLIMIT_CPU, config["cpu_s"], config["cpu_s"] + 1)
    cap(resource.RLIMIT_AS, config["memory_mb"] << 20)
    cap(resource.RLIMIT_NPROC, config["processes"])
    cap(resource.RLIMIT_FSIZE, config["file_size_mb"] << 20)
    cap(resource.RLIMIT_NOFILE, config["open_files"])
    cap(resource.RLIMIT_CORE, 0)


def _child(request: dict, config: dict, workdir: str, fds: tuple[int, int, int, int]) -> None:
    """The forked child: its own session, limits, unprivileged user, working directory, fds."""
    try:
        stdin, out, err, values = fds
        os.setsid()
        for target, fd in ((0, stdin), (1, out), (2, err), (3, values)):
            os.dup2(fd, target)
        os.closerange(4, 1 << 16)
        _limit(config)
        if config.get("drop_to_uid") is not None:  # root on the host: run as an unprivileged user
            os.setgroups([])
            os.setgid(config["drop_to_uid"])
            os.setuid(config["drop_to_uid"])
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update(_clean_env(workdir))
    except BaseException:  # noqa: BLE001 - set-up failed: never run the program unconfined
        os._exit(120)
    _run_program(request["source"], request.get("calls", []))


# ------------------------------------------------------------------------------ the worker
def _clean_env(home: str) -> dict[str, str]:
    return {"PATH": _CLEAN_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1"}


def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _private_mounts(homes: list[str]) -> None:
    """In our own mount namespace: everything read-only, then empty tmpfs where programs may
    write (and where the host keeps files a program must not touch, like the home directory)."""
    libc = _libc()
    ms_rdonly, ms_remount, ms_bind, ms_rec, ms_private = 1, 32, 4096, 16384, 1 << 18

    def mount(source, target, fstype, flags, data, required=True):
        if libc.mount(source, target.encode(), fstype, flags, data) != 0 and required:
            raise OSError(ctypes_errno(), f"sandbox: mount {target} failed")

    def ctypes_errno():
        import ctypes

        return ctypes.get_errno()

    mount(b"none", "/", None, ms_rec | ms_private, None)
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    for target in targets:
        if not target.startswith(("/proc", "/dev", "/sys")):  # / must succeed; others are best effort
            mount(None, target, None, ms_remount | ms_bind | ms_rdonly, None, required=target == "/")
    for path in ("/tmp", "/var/tmp", "/dev/shm", *homes):
        if os.path.isdir(path):
            mount(b"tmpfs", path, b"tmpfs", 0, b"size=64m,mode=1777")


def _kill_group(pid: int) -> None:
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        with contextlib.suppress(ProcessLookupError):
            kill(target, signal.SIGKILL)


def _kill_strays(namespaced: bool) -> bool:
    """Kill every process the program left (forked children, daemons, new sessions) and reap;
    whether there were any."""
    deadline, found = time.monotonic() + 5, False
    while time.monotonic() < deadline:
        found = found or (_others_alive() if namespaced else bool(_children_of(os.getpid())))
        if namespaced:
            with contextlib.suppress(ProcessLookupError):  # as PID 1 of our namespace, -1 is every
                os.kill(-1, signal.SIGKILL)  # other process in it, and nothing outside
        else:
            for pid in _children_of(os.getpid()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        reaped = _reap()
        if not reaped and not (_children_of(os.getpid()) if not namespaced else _others_alive()):
            return found
        time.sleep(0.002)
    return found


def _reap() -> int:
    n = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return n
        if pid == 0:
            return n
        n += 1


def _children_of(parent: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(entry))
    return out


def _others_alive() -> bool:
    return any(e.isdigit() and e != "1" for e in os.listdir("/proc"))


def _run_one(request: dict, config: dict, namespaced: bool, root: str, n: int) -> dict:
    workdir = os.path.join(root, f"call-{n}")
    os.mkdir(workdir, 0o700)
    if config.get("drop_to_uid") is not None:
        os.chown(workdir, config["drop_to_uid"], config["drop_to_uid"])
    stdin_path = os.path.join(root, f"stdin-{n}")
    with open(stdin_path, "w") as f:
        f.write(request.get("stdin", ""))
    stdin = os.open(stdin_path, os.O_RDONLY)
    pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, values
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(request, config, workdir, (stdin, pipes[0][1], pipes[1][1], pipes[2][1]))
    os.close(stdin)
    for _, w in pipes:
        os.close(w)
    readers = {r: i for i, (r, _) in enumerate(pipes)}
    chunks: list[list[bytes]] = [[], [], []]
    sizes = [0, 0, 0]
    status, detail = None, ""
    deadline = start + config["wall_s"]
    while readers:
        left = deadline - time.monotonic()
        if left <= 0:
            status, detail = "timeout", f"wall clock over {config['wall_s']} s"
            break
        ready, _, _ = select.select(list(readers), [], [], left)
        for fd in ready:
            data = os.read(fd, 65536)
            if not data:
                del readers[fd]
                continue
            i = readers[fd]
            chunks[i].append(data)
            sizes[i] += len(data)
        if sum(sizes) > config["output_bytes"]:
            status, detail = "output_limit", f"wrote more than {config['output_bytes']} bytes"
            break
    if status:
        _kill_group(pid)
    code = None
    while True:  # the pipes are closed (or we gave up): the program is done, or about to be killed
        waited, wstatus = os.waitpid(pid, os.WNOHANG)
        if waited:
            code = wstatus
            break
        if time.monotonic() > deadline:
            status = status or "timeout"
            detail = detail or "closed its output but kept running"
            _kill_group(pid)
            _, code = os.waitpid(pid, 0)
            break
        time.sleep(0.001)
    wall = time.monotonic() - start
    strays = _kill_strays(namespaced)
    for r, _ in pipes:
        with contextlib.suppress(OSError):
            os.close(r)
    exit_code = os.waitstatus_to_exitcode(code)
    sig = -exit_code if exit_code < 0 else None
    if status is None:
        if sig is not None:
            status = "killed"
            detail = {signal.SIGXCPU: "CPU time limit", signal.SIGXFSZ: "file size limit",
                      signal.SIGKILL: "killed (CPU or memory limit)"}.get(sig, f"signal {sig}")
        elif exit_code == 120:
            status, detail = "unavailable", "sandbox set-up failed in the child"
        elif strays:
            status, detail = "error", "left processes running (killed)"
        else:
            status = "ok" if exit_code == 0 else "error"
    values = []
    for line in b"".join(chunks[2]).decode(errors="replace").splitlines():
        try:
            values.append(json.loads(line))
        except ValueError:
            values.append(f"<unparseable {line[:40]!r}>")
    cap = config["output_bytes"]
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    os.unlink(stdin_path)
    return asdict(Result(status=status, exit_code=None if sig is not None else exit_code, signal=sig,
                         stdout=b"".join(chunks[0])[:cap].decode(errors="replace"),
                         stderr=b"".join(chunks[1])[:cap].decode(errors="replace"),
                         values=values, wall_s=round(wall, 6), detail=detail))


def _read_message(fd: int) -> dict | None:
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    body = _read_exactly(fd, _HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)


def _read_exactly(fd: int, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        data = os.read(fd, n - len(buf))
        if not data:
            return None
        buf += data
    return buf


def _write_message(fd: int, message: dict) -> None:
    body = json.dumps(message).encode()
    os.write(fd, _HEADER.pack(len(body)) + body)


def serve(config: dict) -> None:
    """The worker loop: one request at a time on stdin, one result on stdout."""
    import tempfile

    namespaced = os.getpid() == 1
    if namespaced:
        _private_mounts(config.get("homes", []))
    else:  # orphans of the program are re-parented to us, so that we can find and kill them
        _libc().prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    _libc().prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the program cannot ptrace or read our memory
    import importlib

    for name in PRELOADED:
        importlib.import_module(name)
    root = tempfile.mkdtemp(prefix="r1-sandbox-")
    os.chmod(root, 0o711)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    n = 0
    while (request := _read_message(0)) is not None:
        n += 1
        _write_message(1, _run_one(request, config, namespaced, root, n))


# ------------------------------------------------------------------------------ the trainer's side
_MODE: str | None = None
_MODE_LOCK = threading.Lock()


def _namespace_command() -> list[str]:
    base = ["unshare", "--pid", "--fork", "--kill-child", "--net", "--mount", "--mount-proc"]
    return base if os.geteuid() == 0 else [*base, "--map-root-user"]


def isolation_mode(config: dict) -> str:
    """`namespaced` where this process may create PID, network and mount namespaces and a worker
    set up in them runs a program, else `process-group`; probed once per process."""
    global _MODE
    with _MODE_LOCK:
        if _MODE is None:
            _MODE, reason = _probe(config)
            if _MODE != "namespaced":
                import logging

                logging.getLogger(__name__).warning(
                    "sandbox: namespaces unavailable (%s); untrusted code runs in its own process group "
                    "WITHOUT network or file-system isolation (see r1core/sandbox.py)", reason or "unshare failed")
        return _MODE


def _probe(config: dict) -> tuple[str, str]:
    try:
        probe = subprocess.run([*_namespace_command(), "true"], capture_output=True, timeout=10, env=_clean_env("/"),
                               check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "process-group", str(exc)
    if probe.returncode != 0:
        return "process-group", probe.stderr.decode(errors="replace").strip()
    worker = _Worker(config, "namespaced")
    reply = worker.call({"source": "print(1)", "calls": []}, 30)
    worker.close()
    if not reply or reply["status"] != "ok":
        return "process-group", f"a namespaced worker could not run a program: {reply}"
    return "namespaced", ""


def _private_homes() -> list[str]:
    """Home directories to hide behind empty tmpfs mounts, but none that holds this Python."""
    homes = {os.path.expanduser("~"), "/root", "/home"}
    needed = [os.path.realpath(p) for p in (sys.executable, sys.prefix, sys.base_prefix, __file__)]
    return sorted(h for h in homes if os.path.isdir(h)
                  and not any(p == h or p.startswith(h.rstrip("/") + "/") for p in needed))


class _Worker:
    def __init__(self, config: dict, mode: str):
        self.config, self.mode = config, mode
        prefix = _namespace_command() if mode == "namespaced" else []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-I", "-S", os.path.abspath(__file__), "--serve", json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_clean_env("/"),
            start_new_session=True, close_fds=True)

    def call(self, request: dict, timeout: float) -> dict | None:
        """The worker's result, or None when it died or did not answer in time (then it is killed)."""
        try:
            _write_message(self.proc.stdin.fileno(), request)
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            reply = _read_message(self.proc.stdout.fileno()) if ready else None
        except OSError:
            reply = None
        if reply is None:
            self.close()
        return reply

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()


class Sandbox:
    """A pool of warm sandbox workers (`workers` of them, started on first use and replaced
    when one dies). `run` is thread-safe; calls beyond the pool size wait for a free worker.

    `config` is a `SandboxConfig` (or its dict). `warm=False` starts a fresh worker for every
    call (the cold path, for comparison)."""

    def __init__(self, config=None, warm: bool = True):
        from r1core.config import SandboxConfig

        cfg = SandboxConfig.model_validate(config or {})
        self.settings = cfg
        self.config = {**cfg.model_dump(exclude={"workers", "require_isolation", "uid"}),
                       "homes": _private_homes(), "drop_to_uid": cfg.uid if os.geteuid() == 0 else None}
        self.mode = isolation_mode(self.config)
        if cfg.require_isolation and self.mode != "namespaced":
            raise RuntimeError("sandbox.require_isolation: namespaces are not available on this machine "
                               "(unshare failed); refusing to run untrusted code without them")
        self.warm = warm
        self._idle: list[_Worker] = []
        self._slots = threading.Semaphore(cfg.workers)
        self._lock = threading.Lock()
        self.counts = {s: 0 for s in STATUSES}

    def run(self, source: str, calls: list[str] | None = None, stdin: str = "") -> Result:
        """Run `source` as a program, then evaluate each of `calls` in its namespace."""
        request = {"source": source, "calls": list(calls or []), "stdin": stdin}
        with self._slots:
            worker = self._take()
            reply = worker.call(request, self.config["wall_s"] + 10) if worker else None
            if worker is not None and worker.alive() and self.warm:
                with self._lock:
                    self._idle.append(worker)
            elif worker is not None:
                worker.close()
        result = Result(**reply) if reply else Result(status="unavailable", detail="sandbox worker unavailable")
        with self._lock:
            self.counts[result.status] += 1
        return result

    def _take(self) -> _Worker | None:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.alive():
                    return worker
                worker.close()
        try:
            return _Worker(self.config, self.mode)
        except OSError:
            return None

    def close(self) -> None:
        with self._lock:
            workers, self._idle = self._idle, []
        for w in workers:
            w.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *_) -> None:
        self.close()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--serve":
    serve(json.loads(sys.argv[2]))
