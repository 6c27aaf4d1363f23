"""Untrusted Python in a separate process with hard limits: the sandbox behind the code rewards.

A program written by the model is untrusted input. It runs in a fresh process forked by a
*sandbox worker*, never in the trainer. A worker serves one program at a time; a pool of warm
workers (`Sandbox`) keeps the cost of a call to a fork instead of an interpreter start-up.

How results come back (the test protocol, `_Exchange`): the program runs as `__main__`; then its
harness says "ready" on a result channel (fd 3) and the worker sends the tests one at a time on
a request channel (fd 4), each only after the reply to the previous one. A reply is accepted
only after its test was sent, exactly one per test and in order; a value before "ready", before
its test or beyond the last one is a protocol violation and the run's results do not count. A
test is a call (its value comes back as tagged JSON, `encode`, and is compared with the
expected value in the trainer, which the program never sees) or a check function (HumanEval's
`check(candidate)`, MBPP's asserts): that runs twice, first in the program's process with the
program's functions behind recorders, returning only the calls made and their results, then in
a fresh process that never ran the program, on those recorded results, where its asserts are
judged (`_Check`). A value the harness cannot encode (a non-builtin type, deep nesting, a
huge integer) fails its test.

What is isolated, per program (limits from `SandboxConfig`, set before the program's first
instruction):
- time: wall clock (the worker kills the whole process group; the parent kills the worker if
  the worker itself stops answering), CPU seconds (RLIMIT_CPU);
- memory: address space (RLIMIT_AS), so a 10 GB allocation is a MemoryError;
- processes: RLIMIT_NPROC, counted per user, and every process the program left behind is
  killed after the call (see "modes");
- files: file size (RLIMIT_FSIZE), open files (RLIMIT_NOFILE), no core dumps; stdin is the
  test's; stdout and stderr are capped (`output_bytes`; the program is killed past it);
- environment: a fixed, minimal environment (PATH, HOME, TMPDIR, LANG); the worker is started
  with that environment too and imports only the standard library, so no variable, credential
  or tracking URI of the trainer reaches the program, neither through `os.environ` nor through
  `/proc/<pid>/environ` of its parent.

Modes (chosen once per process by probing; the mode is logged and in `Sandbox.mode`):
- `namespaced` (where the OS permits user or root namespaces): each worker runs as PID 1 of its
  own PID, network and mount namespaces: no network but a loopback that is down. Each program
  then sees only a root file system built for it (`_template_root`, which the worker itself
  enters with `pivot_root`, detaching the host's): read-only binds of the interpreter's
  standard library and the system library directories (`SYSTEM_VIEW`), a few devices, the
  namespace's own /proc, and a fresh tmpfs per program (`tmp_mb`, `tmp_inodes`,
  `_fresh_scratch`) behind /tmp, /var/tmp, /dev/shm and /sandbox (its working directory and
  home). The host's root is
  detached: the project, data, checkpoints, stores and home directories do not exist for it,
  and nothing it writes survives it or reaches the next program. After each call the worker
  kills every other process of its namespace (`kill(-1)` from PID 1); when the worker dies the
  kernel kills the whole namespace. Run as root, the program drops to an unprivileged user
  (`uid`, default nobody); in either case it keeps no capability (bounding set emptied,
  no-new-privileges).
- `process-group` (fallback): the program runs in its own session, in a temporary working
  directory; stray processes are found by parentage (the worker is a child subreaper) and
  killed after each call. There is NO network isolation and NO file-system isolation beyond the
  user's permissions in this mode (it sees the host's files, /tmp is shared): the log line says
  so, and `SandboxConfig.require_isolation` turns it into an error instead.

Not isolated in either mode: CPU time is limited but not shared fairly with the trainer (a
program can use its CPU seconds on any core); it runs the same Python as the trainer (without
site-packages or the project on its path; `ctypes` works), contained by the limits above, not by
a language-level jail; inside its own process it can patch the harness (see "What an in-process
harness cannot prevent" in docs/design.md: a program that knows the expected values can return them).

This file is also the worker program: `python -I -S sandbox.py --serve CONFIG_JSON` (standard
library only, on purpose).
"""
from __future__ import annotations

import builtins
import contextlib
import functools
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
# cost it nothing (any other standard-library module is importable too, from the read-only view).
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


# ------------------------------------------------------------------------------ values on the wire
# Test values cross processes as JSON with the Python types that JSON lacks tagged, so that a
# tuple stays a tuple and a set a set. Only the builtin types themselves are encoded (never a
# subclass, whose __eq__ or __repr__ the program controls); anything else, nesting deeper than
# MAX_DEPTH or an integer of more than 4,300 digits is not a value (`Unencodable`).
MAX_DEPTH = 64


class Unencodable(ValueError):
    pass


def encode(value, depth: int = 0):
    if depth > MAX_DEPTH:
        raise Unencodable("nested too deeply")
    t = type(value)
    if value is None or t in (bool, str):
        return value
    if t is int:
        if abs(value) >= 1 << 53:  # exact beyond float precision, and bounded in digits
            return {"<int>": str(value)}
        return value
    if t is float:
        return value if value == value and value not in (float("inf"), float("-inf")) else {"<float>": repr(value)}
    if t is list:
        return [encode(v, depth + 1) for v in value]
    if t in (tuple, set, frozenset):
        items = [encode(v, depth + 1) for v in value]
        return {f"<{t.__name__}>": sorted(items, key=repr) if t is not tuple else items}
    if t is dict:
        return {"<dict>": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if t is bytes:
        return {"<bytes>": value.hex()}
    if t is complex:
        return {"<complex>": [repr(value.real), repr(value.imag)]}
    raise Unencodable(f"not a plain value: {t.__name__}")


def decode(data, depth: int = 0):
    """The Python value of an `encode`d one; `Unencodable` for anything that is not one."""
    if depth > MAX_DEPTH:
        raise Unencodable("nested too deeply")
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode(v, depth + 1) for v in data]
    if type(data) is not dict or len(data) != 1:
        raise Unencodable("not an encoded value")
    (tag, body), = data.items()
    if tag == "<int>":
        return int(body)
    if tag == "<float>":
        return float(body)
    if tag in ("<tuple>", "<set>", "<frozenset>"):
        items = [decode(v, depth + 1) for v in body]
        return {"<tuple>": tuple, "<set>": set, "<frozenset>": frozenset}[tag](items)
    if tag == "<dict>":
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
    if tag == "<bytes>":
        return bytes.fromhex(body)
    if tag == "<complex>":
        return complex(float(body[0]), float(body[1]))
    raise Unencodable(f"unknown tag {tag!r:.20}")


# ------------------------------------------------------------------------------ the program's side
def _run_program(source: str) -> None:
    """In the forked, limited child: run the program as __main__, say "ready" on the result
    channel (fd 3), then answer the tests the worker sends on fd 4 afterwards, one JSON line per
    test, until fd 4 closes. Everything here is reachable (and patchable) by the program;
    nothing here decides pass or fail (see `Sandbox`)."""
    # taken before the program runs, so that patching builtins, json, os or this module's globals
    # does not reach them
    dumps, loads, write, evaluate, compile_, exit_ = json.dumps, json.loads, os.write, eval, compile, os._exit
    answer, lines_of = _answer, _lines_of
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile_(source, "<program>", "exec"), namespace)
        sys.stdout.flush()
        write(3, b'{"ready": true}\n')
        requests = io.FileIO(4, "r", closefd=False)
        for request in lines_of(requests):
            test = loads(request)
            try:
                reply = dumps(answer(test, namespace, evaluate, compile_))
            except (TypeError, ValueError, RecursionError, MemoryError) as exc:  # an unencodable value
                reply = dumps({"unencodable": type(exc).__name__})
            write(3, (reply + "\n").encode())
        sys.stdout.flush()
    except SystemExit as exc:
        exit_(exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1))
    except BaseException:  # noqa: BLE001 - the program's own failure: report and exit non-zero
        traceback.print_exc(limit=5)
        exit_(1)
    exit_(0)


def _lines_of(f):
    buf = b""
    while chunk := f.read(65536):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line


def _answer(test: dict, namespace: dict, evaluate, compile_) -> dict:
    """One test: a call's value, the calls a check made (phase 1), or a check's verdicts replayed
    on recorded values (phase 2, in a process that never ran the model's program)."""
    if "call" in test:
        try:  # a test call that raises fails that test only
            value = evaluate(compile_(test["call"], "<test>", "eval"), namespace)
        except Exception as exc:  # noqa: BLE001
            return {"raised": type(exc).__name__}
        return {"value": encode(value)}
    check = _Check(test, namespace, compile_)
    if "record" in test:
        return {"calls": check.record()}
    return check.replay(test["replay"])


class _Check:
    """A test function run against the program: HumanEval's `check(candidate)`, or the asserts
    of an MBPP row wrapped in one. Its asserts arrive rewritten as `__r1_assert__(i, lambda: x)`
    (code_rewards.check_source), so that one failing assert fails only itself.

    Phase 1 (`record`, in the program's process): the check runs with the program's functions
    behind recorders; what comes back is only the calls (arguments, results) it made. Phase 2
    (`replay`, in a fresh process with only the row's trusted prelude): the same check runs with
    stubs that return the recorded results for the same arguments, and judges them. So a verdict
    never comes from the program's process; the program can only supply return values."""

    def __init__(self, test: dict, namespace: dict, compile_):
        import random

        self.test, self.random = test, random
        self.globals = dict(namespace)
        if test.get("prelude") and "record" in test:  # what the check may use that the program lacks
            prelude: dict = {"__name__": "__main__", "__builtins__": builtins}
            exec(compile_(test["prelude"], "<prelude>", "exec"), prelude)
            for name, value in prelude.items():
                self.globals.setdefault(name, value)
        self.outcomes: list = [None] * test["asserts"]
        self.globals["__r1_assert__"] = self._assert
        self.code = compile_(test["check"], "<check>", "exec")

    def _assert(self, i: int, condition) -> None:
        try:
            ok = bool(condition())
        except Exception:  # noqa: BLE001 - a raising assert is a failed one
            ok = False
        self.outcomes[i] = ok and self.outcomes[i] is not False

    def _run(self, functions: dict) -> bool:
        """Run the check with `functions` (name -> callable) bound; whether it ran to the end."""
        self.random.seed(0)  # the same draws in both phases
        self.globals.update(functions)
        try:
            exec(self.code, self.globals)
            check, argument = self.globals.get("check"), functions.get(self.test.get("argument"))
            if callable(check):
                check(argument) if argument is not None and _takes_argument(check) else check()
        except Exception:  # noqa: BLE001 - the check stopped early: what it did not reach fails
            return False
        return True

    def record(self) -> list:
        calls = []

        def recorder(name, fn):
            def call(*args, **kwargs):
                key = _encoded_args(args, kwargs)
                state = self.random.getstate()  # the program's use of `random` must not move the check's
                try:
                    result = fn(*args, **kwargs)
                except Exception as exc:
                    calls.append({"name": name, "args": key, "raised": type(exc).__name__})
                    raise
                finally:
                    self.random.setstate(state)
                try:
                    encoded = {"result": encode(result)}
                except Unencodable as exc:
                    encoded = {"unencodable": str(exc)}
                after = _encoded_args(args, kwargs)
                calls.append({"name": name, "args": key, **({"after": after} if after != key else {}), **encoded})
                if "unencodable" in encoded:
                    raise TypeError("the result is not a plain value")
                return result
            return call

        functions = {}
        for name in self.test["stubs"]:
            target = self.globals.get(self.test.get("entry_point") if name == self.test.get("argument") else name)
            if callable(target):
                functions[name] = recorder(name, target)
        self._run(functions)
        return calls

    def replay(self, calls: list) -> dict:
        pending = list(reversed(calls))

        def stub(name):
            def call(*args, **kwargs):
                if not pending:
                    raise LookupError("more calls than recorded")
                record = pending.pop()
                if record.get("name") != name or record.get("args") != _encoded_args(args, kwargs):
                    pending.clear()
                    raise LookupError("the check called differently from the recording")
                if "after" in record:  # the program changed a list or dict argument in place
                    for arg, after in zip(args, decode(record["after"])[0], strict=False):
                        if type(arg) is list:
                            arg[:] = after
                        elif type(arg) is dict:
                            arg.clear()
                            arg.update(after)
                if "result" not in record:
                    raise RuntimeError(record.get("raised") or "no result")
                return decode(record["result"])
            return call

        completed = self._run({name: stub(name) for name in self.test["stubs"]})
        return {"outcomes": self.outcomes, "completed": completed and not pending}


def _takes_argument(fn) -> bool:
    code = getattr(fn, "__code__", None)
    return code is not None and code.co_argcount >= 1


def _encoded_args(args: tuple, kwargs: dict):
    try:
        return encode((tuple(args), dict(kwargs)))
    except Unencodable as exc:
        return {"<unencodable>": str(exc)}


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


def _child(request: dict, config: dict, namespaced: bool, workdir: str, fds: tuple[int, ...]) -> None:
    """The forked child: its own session and view of the file system, limits, unprivileged user,
    working directory, fds 0-4 (stdin, stdout, stderr, results, tests)."""
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(len(fds), 1 << 16)
        if namespaced:  # the worker's template root, with this program's fresh tmpfs behind /sandbox
            workdir = "/sandbox"
        _limit(config)
        if config.get("drop_to_uid") is not None:  # root on the host: run as an unprivileged user
            os.setgroups([])
            os.setgid(config["drop_to_uid"])
            os.setuid(config["drop_to_uid"])
        if namespaced:
            _drop_capabilities()
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update(_clean_env(workdir, "/tmp" if namespaced else workdir))
    except BaseException:  # noqa: BLE001 - set-up failed: never run the program unconfined
        os._exit(120)
    _run_program(request["source"])


# ------------------------------------------------------------------------------ the worker
def _clean_env(home: str, tmp: str | None = None) -> dict[str, str]:
    return {"PATH": _CLEAN_PATH, "HOME": home, "TMPDIR": tmp or home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1"}


@functools.cache
def _libc():
    """libc, loaded once per process (`find_library` runs `ldconfig` in a subprocess each time)."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
CLONE_NEWNS, MNT_DETACH = 0x20000, 2
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


def _mount(source, target: str, fstype, flags: int, data=None, required: bool = True) -> bool:
    libc = _libc()
    if libc.mount(source, target.encode(), fstype, flags, data) == 0:
        return True
    if required:
        import ctypes

        raise OSError(ctypes.get_errno(), f"sandbox: mount {target} failed")
    return False


def _worker_mounts() -> None:
    """The worker's own mount namespace: every mount read-only, and a private /tmp for its
    per-call files (programs never see this view: the worker then enters `_template_root`)."""
    _mount(b"none", "/", None, MS_REC | MS_PRIVATE)
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    for target in targets:
        if not target.startswith(("/proc", "/dev", "/sys")):  # / must succeed; others are best effort
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY, required=target == "/")
    _mount(b"tmpfs", "/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=16m,mode=1777")


WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/sandbox")  # each a link into the program's own tmpfs


def _scratch(path: str) -> str:
    """Where a writable path of the program lives in its tmpfs: /tmp -> /w/tmp, /var/tmp -> /w/var_tmp."""
    return "/w/" + path.strip("/").replace("/", "_")


def _template_root(config: dict) -> None:
    """Once per worker: the root file system every program of this worker starts from, at
    `config["staging"]`: a small read-only tmpfs holding read-only binds of the interpreter's
    standard library and the system directories its extension modules load from (`view`), a few
    device nodes, and links from /tmp, /var/tmp, /dev/shm and /sandbox into /w, where each program
    gets a fresh tmpfs of its own (`_fresh_scratch`). Building it costs ~20 mounts, of 1-5 ms
    each here, so it is done once, and the worker enters it (`_enter`) before any program."""
    new = config["staging"]
    _mount(b"tmpfs", new, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,nr_inodes=1024,mode=755")
    for path in config["view"]:
        target = new + path
        if os.path.islink(path):  # /lib -> usr/lib on merged-/usr systems
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
            continue
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        elif os.path.exists(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        else:
            continue
        device = path.startswith("/dev/")
        _mount(path.encode(), target, None, MS_BIND | MS_REC)
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (0 if device else MS_NODEV),
               required=False)
    os.makedirs(new + "/w", exist_ok=True)
    os.makedirs(new + "/.old", exist_ok=True)
    for path in WRITABLE:
        os.makedirs(os.path.dirname(new + path), exist_ok=True)
        os.symlink(_scratch(path), new + path)
    _mount(None, new, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, b"size=1m,nr_inodes=1024,mode=755")


def _fresh_scratch(config: dict, first: bool = False) -> None:
    """In the worker, before each program: a fresh tmpfs on the template's /w, bounded in bytes
    and inodes, for everything the next program may write. The previous one is detached (and
    freed once its program's namespace is gone). Done after the reply is sent, so that its
    mount, which takes milliseconds, is off the call's path."""
    scratch = config["staging"] + "/w"
    if not first:
        _libc().umount2(scratch.encode(), MNT_DETACH)
    options = f"size={config['tmp_mb']}m,nr_inodes={config['tmp_inodes']},mode=755".encode()
    _mount(b"tmpfs", scratch, b"tmpfs", MS_NOSUID | MS_NODEV, options)
    for path in WRITABLE:
        target = config["staging"] + _scratch(path)
        mode = 0o700 if path == "/sandbox" else 0o1777
        os.mkdir(target, mode)
        os.chmod(target, mode)
        if path == "/sandbox" and config.get("drop_to_uid") is not None:
            os.chown(target, config["drop_to_uid"], config["drop_to_uid"])


def _enter(new_root: str) -> None:
    """Make `new_root` this mount namespace's root and detach the host's (`pivot_root`): nothing
    of the host outside the template is reachable any more, by the worker or its programs."""
    import platform

    libc = _libc()
    os.chdir(new_root)
    if libc.syscall(PIVOT_ROOT[platform.machine()], b".", b".old") != 0:
        raise OSError("sandbox: pivot_root failed")
    os.chdir("/")
    if libc.umount2(b"/.old", MNT_DETACH) != 0:
        raise OSError("sandbox: detaching the host's root failed")


def _drop_capabilities() -> None:
    """No capability now or after an exec (as root of a user namespace the program would keep
    them): empty bounding set, no new privileges, empty effective/permitted/inheritable sets."""
    import ctypes

    libc = _libc()
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (EINVAL past the last capability)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError("sandbox: PR_SET_NO_NEW_PRIVS failed")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    if libc.capset(header, data) != 0:
        raise OSError("sandbox: capset failed")


def _kill_group(pid: int) -> None:
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        with contextlib.suppress(ProcessLookupError):
            kill(target, signal.SIGKILL)


def _kill_strays(namespaced: bool) -> bool:
    """Kill every process the program left (forked children, daemons, new sessions) and reap;
    whether there were any. Namespaced, the worker is PID 1: every other process of the namespace
    is its descendant and is re-parented to it, so "no child left" means "no process left", and
    `kill(-1)` reaches them all and nothing outside (no /proc needed: programs have none)."""
    deadline, found = time.monotonic() + 5, False
    while time.monotonic() < deadline:
        if namespaced:
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return found
            found = found or pid != 0
            if pid == 0:
                time.sleep(0.0005)
            continue
        children = _children_of(os.getpid())
        found = found or bool(children)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not _reap() and not _children_of(os.getpid()):
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


class _Exchange:
    """The worker's side of the test protocol with one program: nothing may arrive on the result
    channel before "ready"; then each test is sent only after the previous reply, and exactly one
    line may come back per test, after it was sent, in order. Anything else is a protocol
    violation (`broken`), and the run's results do not count."""

    def __init__(self, tests: list[dict], request_fd: int):
        self.pending = [(json.dumps(t) + "\n").encode() for t in tests]
        self.request_fd: int | None = request_fd
        self.out, self.buffer, self.sent = b"", b"", 0
        self.replies: list[bytes] = []
        self.ready, self.broken = False, ""

    def close(self) -> None:
        if self.request_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.request_fd)
            self.request_fd = None

    def received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer and not self.broken:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if not self.ready:
                if line != b'{"ready": true}':
                    self.broken = "values before the program had loaded"
                    return
                self.ready = True
            elif self.out:
                self.broken = "a value before its test was sent"
                return
            elif len(self.replies) >= self.sent:
                self.broken = "more values than tests"
                return
            else:
                self.replies.append(line)
            if self.pending:
                self.out, self.sent = self.pending.pop(0), self.sent + 1
            else:
                self.close()  # end of the tests: the program's harness exits

    def writable(self) -> list[int]:
        return [self.request_fd] if self.out and self.request_fd is not None else []

    def write(self) -> None:
        try:
            n = os.write(self.request_fd, self.out)
        except OSError:  # the program closed its end
            self.out = b""
            self.close()
            return
        self.out = self.out[n:]

    def values(self) -> list:
        """The replies as JSON values; one that is not JSON, or nests deeper than an encoded value
        can, is `{"unencodable": ...}` (its test fails: it is never a crash of the trainer)."""
        out = []
        for line in self.replies:
            try:
                value = json.loads(line)
            except (ValueError, RecursionError, MemoryError):
                value = {"unencodable": "not JSON"}
            out.append(value if _depth(value) <= 2 * MAX_DEPTH + 8 else {"unencodable": "nested too deeply"})
        return out


def _depth(value) -> int:
    """Nesting depth of a JSON value (iteratively: the value may be deep)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            todo.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, depth + 1) for v in item)
    return deepest


def _run_one(request: dict, config: dict, namespaced: bool, root: str, n: int) -> dict:
    workdir = os.path.join(root, f"call-{n}")  # the process-group mode's working directory
    if not namespaced:
        os.mkdir(workdir, 0o700)
        if config.get("drop_to_uid") is not None:
            os.chown(workdir, config["drop_to_uid"], config["drop_to_uid"])
    stdin = os.memfd_create("stdin")  # in memory: no file of it anywhere
    os.write(stdin, request.get("stdin", "").encode())
    os.lseek(stdin, 0, os.SEEK_SET)
    pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, results
    tests_r, tests_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(tests_w)
        _child(request, config, namespaced, workdir, (stdin, pipes[0][1], pipes[1][1], pipes[2][1], tests_r))
    os.close(stdin)
    os.close(tests_r)
    os.set_blocking(tests_w, False)
    for _, w in pipes:
        os.close(w)
    exchange = _Exchange(request.get("tests", []), tests_w)
    readers = {r: i for i, (r, _) in enumerate(pipes)}
    chunks: list[list[bytes]] = [[], []]
    sizes = [0, 0, 0]
    status, detail = None, ""
    deadline = start + config["wall_s"]
    while readers:
        left = deadline - time.monotonic()
        if left <= 0:
            status, detail = "timeout", f"wall clock over {config['wall_s']} s"
            break
        ready, writable, _ = select.select(list(readers), exchange.writable(), [], left)
        if writable:
            exchange.write()
        for fd in ready:
            data = os.read(fd, 65536)
            if not data:
                del readers[fd]
                continue
            i = readers[fd]
            sizes[i] += len(data)
            if i == 2:
                exchange.received(data)
            else:
                chunks[i].append(data)
        if sum(sizes) > config["output_bytes"]:
            status, detail = "output_limit", f"wrote more than {config['output_bytes']} bytes"
            break
        if exchange.broken:
            status, detail = "error", f"test protocol: {exchange.broken}"
            break
    exchange.close()
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
        elif exit_code == 0 and len(exchange.replies) != len(request.get("tests", [])):
            status, detail = "error", f"answered {len(exchange.replies)} of {len(request.get('tests', []))} tests"
        else:
            status = "ok" if exit_code == 0 else "error"
    cap = config["output_bytes"]
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    return asdict(Result(status=status, exit_code=None if sig is not None else exit_code, signal=sig,
                         stdout=b"".join(chunks[0])[:cap].decode(errors="replace"),
                         stderr=b"".join(chunks[1])[:cap].decode(errors="replace"),
                         values=exchange.values(), wall_s=round(wall, 6), detail=detail))


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
        _worker_mounts()
    else:  # orphans of the program are re-parented to us, so that we can find and kill them
        _libc().prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    _libc().prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the program cannot ptrace or read our memory
    import importlib

    for name in PRELOADED:
        importlib.import_module(name)
    root = tempfile.mkdtemp(prefix="r1-sandbox-")
    os.chmod(root, 0o711)
    config = {**config, "staging": os.path.join(root, "root"),
              "view": [*config["view"], *(p for p in sys.path if os.path.isdir(p))]}
    os.mkdir(config["staging"], 0o755)
    if namespaced:  # from here on the worker, and every program it forks, sees only the template
        _template_root(config)
        _enter(config["staging"])
        config["staging"] = ""
        _fresh_scratch(config, first=True)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    n = 0
    while (request := _read_message(0)) is not None:
        n += 1
        _write_message(1, _run_one(request, config, namespaced, root, n))
        if namespaced:
            _fresh_scratch(config)


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
    reply = worker.call({"source": "import hashlib\nprint(1)", "tests": [{"call": "1"}]}, 30)
    worker.close()
    if not reply or reply["status"] != "ok":
        return "process-group", f"a namespaced worker could not run a program: {reply}"
    return "namespaced", ""


# What a program sees of the host, read-only (besides the interpreter's standard library, added by
# the worker from its own sys.path): the system directories shared libraries load from, the
# loader's cache, and harmless devices. Paths that do not exist are skipped.
SYSTEM_VIEW = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc/ld.so.cache",
               "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


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

    `settings` is a `code_rewards.SandboxConfig` (this module imports no config: its workers
    run it with the standard library alone). `warm=False` starts a fresh worker for every call
    (the cold path, for comparison)."""

    def __init__(self, settings, warm: bool = True):
        cfg = settings
        self.settings = cfg
        self.config = {**cfg.model_dump(exclude={"workers", "require_isolation", "uid"}),
                       "view": list(SYSTEM_VIEW), "drop_to_uid": cfg.uid if os.geteuid() == 0 else None}
        self.mode = isolation_mode(self.config)
        if cfg.require_isolation and self.mode != "namespaced":
            raise RuntimeError("sandbox.require_isolation: namespaces are not available on this machine "
                               "(unshare failed); refusing to run untrusted code without them")
        self.warm = warm
        self._idle: list[_Worker] = []
        self._slots = threading.Semaphore(cfg.workers)
        self._lock = threading.Lock()
        self.counts = {s: 0 for s in STATUSES}

    def run(self, source: str, tests: list[str | dict] | None = None, stdin: str = "") -> Result:
        """Run `source` as a program, then send it `tests` one by one (a string is a call to
        evaluate in its namespace: `{"call": ...}`); `Result.values` holds one reply per test."""
        tests = [{"call": t} if isinstance(t, str) else t for t in tests or []]
        request = {"source": source, "tests": tests, "stdin": stdin}
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
            while self._idle:  # the longest idle first: it has had time to prepare its next program
                worker = self._idle.pop(0)
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
