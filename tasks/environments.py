"""The vLLM environment (`make vllm-env`) checked against this one before anything trains.

vLLM cannot share Prefect's environment (their pins clash: ../docs/design.md), so its actors run
with another Python (`rollout.vllm.python`). Ray runs actors of one cluster only on one Ray
version and one Python minor version, so a vLLM environment that exists but differs fails late
and obscurely inside Ray; `check_vllm_environment` says so up front, with the command that
fixes it. `r1 doctor` prints the same checks for every environment the configuration uses.
"""
from __future__ import annotations

import json
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "infra" / "vllm-requirements.txt"
INSTALL = "make vllm-env"

# run by the vLLM environment's Python: what it has, without trusting anything it prints but JSON
_PROBE = """
import json, platform, sys
from importlib.metadata import version, PackageNotFoundError
out = {"python": platform.python_version()}
for name in ("vllm", "ray", "torch"):
    try:
        out[name] = version(name)
    except PackageNotFoundError:
        out[name] = None
try:
    import vllm  # noqa: F401  (importable, not only installed)
    out["vllm_import"] = "ok"
except Exception as e:
    out["vllm_import"] = f"{type(e).__name__}: {e}"[:300]
print("R1-PROBE " + json.dumps(out))
"""


class EnvironmentMismatch(RuntimeError):
    """The vLLM environment is missing, broken, or does not match this one."""


def pinned_vllm() -> str:
    for line in REQUIREMENTS.read_text().splitlines():
        if line.startswith("vllm=="):
            return line.split("==", 1)[1].strip()
    raise RuntimeError(f"no vllm pin in {REQUIREMENTS}")


def resolve_python(python: str) -> Path:
    path = Path(python)
    return path if path.is_absolute() else ROOT / path


def probe(python: str, timeout_s: float = 180.0) -> dict:
    """What the environment of `python` holds (`EnvironmentMismatch` if it cannot say)."""
    exe = resolve_python(python)
    fix = f"create it with `{INSTALL}` (or set rollout.vllm.python to an environment installed from {REQUIREMENTS.name})"
    if not exe.is_file():
        raise EnvironmentMismatch(f"vLLM environment: no Python at '{exe}' (rollout.vllm.python); {fix}")
    try:
        done = subprocess.run([str(exe), "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EnvironmentMismatch(f"vLLM environment: '{exe}' could not be run ({e}); {fix}") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("R1-PROBE ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise EnvironmentMismatch(f"vLLM environment: '{exe}' failed its check (exit {done.returncode}: "
                                  f"{' | '.join(tail)}); {fix}")
    try:
        found = json.loads(lines[-1].removeprefix("R1-PROBE "))
    except json.JSONDecodeError as e:
        raise EnvironmentMismatch(f"vLLM environment: '{exe}' answered no readable check ({e}); {fix}") from None
    if not isinstance(found, dict):
        raise EnvironmentMismatch(f"vLLM environment: '{exe}' answered no readable check; {fix}")
    return found


def vllm_problems(found: dict) -> list[str]:
    """How a probed environment differs from what the rollout actors need."""
    ours = {"python": ".".join(platform.python_version_tuple()[:2]), "ray": version("ray"), "vllm": pinned_vllm()}
    problems = []
    theirs_py = ".".join(str(found.get("python", "")).split(".")[:2])
    if theirs_py != ours["python"]:
        problems.append(f"Python {found.get('python')} (Ray needs this environment's {ours['python']})")
    if found.get("ray") != ours["ray"]:
        problems.append(f"ray {found.get('ray')} (this environment's Ray is {ours['ray']}; one cluster, one version)")
    if found.get("vllm") != ours["vllm"]:
        problems.append(f"vllm {found.get('vllm')} ({REQUIREMENTS.name} pins {ours['vllm']})")
    elif found.get("vllm_import") != "ok":
        problems.append(f"vllm does not import: {found.get('vllm_import')}")
    return problems


def check_vllm_environment(python: str) -> dict:
    """The probe of a matching vLLM environment, else `EnvironmentMismatch` naming each difference."""
    found = probe(python)
    problems = vllm_problems(found)
    if problems:
        raise EnvironmentMismatch(f"vLLM environment '{resolve_python(python)}' does not match: "
                                  + "; ".join(problems) + f". Recreate it with `{INSTALL}`")
    return found
