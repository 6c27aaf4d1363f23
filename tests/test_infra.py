"""infra/: every file parses, images are pinned, and the variables and ports the compose file and
the Kubernetes manifests set are the ones the code reads and the servers listen on."""
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from r1core.config import PROJECT_ROOT

INFRA = PROJECT_ROOT / "infra"
# the variable each part of the code reads to find its server
READ_BY = {"PREFECT_API_URL": "flows/cli.py", "MLFLOW_TRACKING_URI": "tasks/tracking.py",
           "RAY_ADDRESS": "tasks/ray_jobs.py"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def compose():
    return _docs(INFRA / "compose.yaml")[0]


@pytest.fixture(scope="module")
def k8s():
    return {(d["kind"], d["metadata"]["name"]): d for p in sorted((INFRA / "k8s").glob("*.yaml")) for d in _docs(p)
            if "metadata" in d}


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    return parts.hostname, parts.port


def test_every_file_parses_and_every_image_is_pinned():
    files = [p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml")]
    assert len(files) >= 8
    images = []
    for path in files:
        for doc in _docs(path):
            images += re.findall(r"image: (\S+)", yaml.safe_dump(doc))
    images += re.findall(r"^FROM (\S+)", (INFRA / "docker" / "Dockerfile").read_text(), re.M)
    assert images
    for image in (i.strip("'\"") for i in images):
        assert ":" in image and not image.endswith((":latest", ":main")), f"unpinned image {image}"
    kustomization = _docs(INFRA / "k8s" / "kustomization.yaml")[0]
    assert all((INFRA / "k8s" / r).is_file() for r in kustomization["resources"])


def test_the_variables_set_are_the_ones_the_code_reads(compose, k8s):
    for name, source in READ_BY.items():
        assert re.search(rf"environ(\.get\(|\[)\"{name}\"", (PROJECT_ROOT / source).read_text()), (name, source)
    worker = compose["services"]["prefect-worker"]["environment"]
    assert set(READ_BY) <= set(worker)
    assert set(READ_BY) <= set(k8s[("ConfigMap", "r1-endpoints")]["data"])
    for container in _containers(k8s):
        if container["name"] == "worker":
            assert {"configMapRef": {"name": "r1-endpoints"}} in container["envFrom"]


def test_every_server_setting_is_a_real_one(compose, k8s):
    """A misspelt setting is silently ignored: each variable set must be one the code reads, a
    setting Prefect or MLflow defines, a credential boto3 reads, or one a command expands."""
    import mlflow.environment_variables
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names

    prefect_settings = _get_valid_setting_names(Settings)
    expanded = set(re.findall(r"\$(\w+)", yaml.safe_dump(k8s)))
    names = {n for s in compose["services"].values() for n in s.get("environment", {})}
    names |= set(k8s[("ConfigMap", "r1-endpoints")]["data"]) | set(k8s[("Secret", "r1-stores")]["stringData"])
    names |= {e["name"] for c in _containers(k8s) for e in c.get("env", [])}
    for name in names:
        known = (name in READ_BY or name in prefect_settings or hasattr(mlflow.environment_variables, name)
                 or name in expanded or name in {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_MODE"}
                 or name.startswith(("POSTGRES_", "MINIO_")))
        assert known, f"{name}: read by nothing"


def test_compose_ports_match_what_the_servers_listen_on(compose):
    services = compose["services"]
    env = services["prefect-worker"]["environment"]
    prefect_host, prefect_port = _host_port(env["PREFECT_API_URL"])
    assert urlsplit(env["PREFECT_API_URL"]).path == "/api"
    assert prefect_host in services and int(_flag(services[prefect_host]["command"], "--port")) == prefect_port
    mlflow_host, mlflow_port = _host_port(env["MLFLOW_TRACKING_URI"])
    mlflow_cmd = services[mlflow_host]["command"]
    assert int(_flag(mlflow_cmd, "--port")) == mlflow_port and "--serve-artifacts" in mlflow_cmd
    assert _flag(mlflow_cmd, "--artifacts-destination").startswith("s3://")
    assert _host_port(services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"]) == \
        ("minio", int(_flag(services["minio"]["command"], "--address").lstrip(":")))
    ray_host, ray_port = _host_port(env["RAY_ADDRESS"])
    assert int(_flag(services[ray_host]["command"], "--port")) == ray_port
    assert _flag(services["ray-worker"]["command"], "--address") == env["RAY_ADDRESS"]
    # the UIs are published on loopback only, on the ports the servers listen on
    assert f"127.0.0.1:{prefect_port}:{prefect_port}" in services[prefect_host]["ports"]
    assert f"127.0.0.1:{mlflow_port}:{mlflow_port}" in services[mlflow_host]["ports"]
    # the worker and every Ray node share the workdir the worker is configured with
    workdir = _flag(services["prefect-worker"]["command"], "--set").split("=", 1)[1]
    for name in ("prefect-worker", "ray-head", "ray-worker"):
        assert f"r1-work:{workdir}" in services[name]["volumes"], name


def _containers(k8s) -> list[dict]:
    out = []
    for doc in k8s.values():
        spec = doc.get("spec", {})
        templates = [spec.get("template")] if "template" in spec else []
        if doc["kind"] == "RayCluster":
            templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        out += [c for t in templates if t for c in t["spec"]["containers"]]
    return out


def _service_port(k8s, name: str) -> tuple[int, int]:
    port = k8s[("Service", name)]["spec"]["ports"][0]
    return port["port"], port["targetPort"]


def test_k8s_endpoints_point_at_the_services_and_ports(k8s):
    endpoints = k8s[("ConfigMap", "r1-endpoints")]["data"]
    commands = {c["name"]: c.get("command", []) + c.get("args", []) for c in _containers(k8s)}
    host, port = _host_port(endpoints["PREFECT_API_URL"])
    assert _service_port(k8s, host) == (port, int(_flag(commands["prefect-server"], "--port")))
    host, port = _host_port(endpoints["MLFLOW_TRACKING_URI"])
    assert _service_port(k8s, host)[0] == port
    assert f"--port {_service_port(k8s, host)[1]}" in " ".join(commands["mlflow"])
    ray = next(d for (kind, _), d in k8s.items() if kind == "RayCluster")
    host, port = _host_port(endpoints["RAY_ADDRESS"])
    assert host == f"{ray['metadata']['name']}-head-svc"  # the service KubeRay creates for the head
    head_ports = {p["name"]: p["containerPort"] for p in ray["spec"]["headGroupSpec"]["template"]["spec"]
                  ["containers"][0]["ports"]}
    assert head_ports["gcs"] == port
    claims = set(re.findall(r"claimName: (\S+)", yaml.safe_dump(list(k8s.values()))))
    assert claims == {k8s[("PersistentVolumeClaim", "r1-work")]["metadata"]["name"]}
    assert "ReadWriteMany" in k8s[("PersistentVolumeClaim", "r1-work")]["spec"]["accessModes"]


def test_the_image_installs_the_pinned_torch_the_makefile_uses():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    torch_spec = re.search(r"TORCH_SPEC \?= (\S+)", (PROJECT_ROOT / "Makefile").read_text()).group(1)
    assert f"pip install {torch_spec}" in dockerfile
    assert '".[infra]"' in dockerfile
