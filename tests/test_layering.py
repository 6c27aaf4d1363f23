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


def _r1core_import_graph() -> dict[str, set[str]]:
    """module -> the r1core modules it imports (any import, lazy ones inside functions too)."""
    import ast
    from pathlib import Path

    import r1core

    root = Path(r1core.__file__).parent
    modules = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for m in modules:
        edges = set()
        for node in ast.walk(ast.parse((root / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "r1core":
                    edges |= {a.name for a in node.names}
                elif node.module.startswith("r1core."):
                    edges.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                edges |= {a.name.split(".")[1] for a in node.names if a.name.startswith("r1core.")}
        graph[m] = (edges & modules) - {m}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, or None (depth-first search, colours)."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_r1core_import_graph_is_acyclic():
    """Registries live where config validation can import them without anything importing the
    config back; a new back edge fails here, naming the cycle."""
    graph = _r1core_import_graph()
    assert {"config", "rewards", "problems", "sandbox"} <= set(graph)  # the graph was read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_store_check_sees_a_new_or_touched_store(tmp_path):
    """The session-end check of conftest (`pytest_sessionfinish`) fails a run that leaves an MLflow
    database, Ray results or run outputs where the project's workdir would be."""
    import time

    from conftest import changed_stores, store_snapshot

    (tmp_path / ".r1" / "runs" / "old").mkdir(parents=True)
    before = store_snapshot([tmp_path])
    assert changed_stores(before, store_snapshot([tmp_path])) == []
    (tmp_path / "mlflow.db").write_text("")
    (tmp_path / ".r1" / "runs" / "new").mkdir()
    time.sleep(0.01)
    (tmp_path / ".r1" / "runs" / "old" / "x").write_text("")  # a run folder written into
    assert changed_stores(before, store_snapshot([tmp_path])) == sorted(
        str(tmp_path / p) for p in ("mlflow.db", ".r1/runs/new", ".r1/runs/old"))
