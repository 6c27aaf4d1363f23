import subprocess
import sys


def test_r1core_imports_no_orchestration_framework():
    """r1core is the framework-free science: importing all of it loads no prefect, ray or mlflow."""
    code = (
        "import pkgutil, importlib, sys, r1core\n"
        "for m in pkgutil.walk_packages(r1core.__path__, 'r1core.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in {'prefect', 'ray', 'mlflow'})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
