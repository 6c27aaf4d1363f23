"""math-verify behind a hard time limit that works in any thread of any process.

math-verify (the field's maintained checker for symbolic answers) can take unbounded time on
hostile input: a LaTeX power tower such as `9^{9^{9}}` never returns, and its own timeout uses
`signal.alarm`, which only works on the main thread (Ray actors and thread pools are not). So
parsing and verification run in a helper process of ours, one call at a time, over a pipe;
a call that does not answer within `timeout_s` kills the helper (a fresh one starts at once, so
that its imports overlap with what the caller does next) and is reported as a timeout. A call is
therefore bounded by `timeout_s`, plus what is left of a restarted helper's start-up (~1-2 s)
when it comes right after a time-out. Nothing else of math-verify is wrapped.

    python -c "from r1core.math_check import serve; serve()"   # the helper (started for you)
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading

TIMEOUT_S = 2.0  # per call: a parse of the reference, or a parse + verify of one prediction
START_S = 60.0  # a helper's imports (once per process, and after a time-out: it is restarted at once)


class Timeout(Exception):
    """math-verify did not answer in time; the helper process was killed."""


class _Helper:
    proc: subprocess.Popen | None = None
    lock = threading.Lock()


def _start() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from r1core.math_check import serve; serve()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            close_fds=True, start_new_session=True)


def _kill() -> None:
    proc, _Helper.proc = _Helper.proc, None
    if proc is not None:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            stream.close()


def _ask(request: dict, timeout_s: float) -> dict:
    with _Helper.lock:
        if _Helper.proc is None or _Helper.proc.poll() is not None:
            _kill()
            _Helper.proc = _start()
        proc = _Helper.proc
        try:
            if not getattr(proc, "ready", False):  # a fresh helper imports math-verify and sympy first
                ready, _, _ = select.select([proc.stdout], [], [], START_S)
                if not ready or not proc.stdout.readline():
                    _kill()
                    raise Timeout(f"the math-verify helper did not start within {START_S:g} s")
                proc.ready = True
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
            line = proc.stdout.readline() if ready else b""
        except OSError:
            line = b""
        if not line:
            _kill()
            _Helper.proc = _start()  # its imports run while the caller goes on
            raise Timeout(f"math-verify gave no answer within {timeout_s:g} s")
        return json.loads(line)


def parses(text: str, timeout_s: float = TIMEOUT_S) -> bool:
    """Whether math-verify extracts at least one mathematical object from `text`."""
    return bool(_ask({"op": "parse", "gold": text}, timeout_s)["ok"])


def equivalent(gold: str, prediction: str, timeout_s: float = TIMEOUT_S) -> bool:
    """math-verify's verdict that `prediction` equals `gold` (both parsed as math)."""
    return bool(_ask({"op": "verify", "gold": gold, "prediction": prediction}, timeout_s)["ok"])


def close() -> None:
    with _Helper.lock:
        _kill()


# ------------------------------------------------------------------------------ the helper
def serve() -> None:
    import logging

    import math_verify

    logging.disable(logging.CRITICAL)
    sys.stdout.write("ready\n")
    sys.stdout.flush()

    def parse(text: str):
        # the helper is killed from outside when a call is too slow: math-verify's own
        # signal-based timeouts are not needed
        return math_verify.parse(text if "$" in text else f"${text}$", parsing_timeout=None)

    for line in sys.stdin:
        request = json.loads(line)
        try:
            gold = parse(request["gold"])
            if request["op"] == "parse":
                ok = bool(gold)
            else:
                target = parse(request["prediction"])
                ok = bool(gold and target and math_verify.verify(gold, target, timeout_seconds=None))
        except Exception:  # noqa: BLE001 - math-verify failing on an input means "not equal"
            ok = False
        sys.stdout.write(json.dumps({"ok": ok}) + "\n")
        sys.stdout.flush()
    os._exit(0)
