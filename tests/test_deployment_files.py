"""docker-compose.yml and Dockerfile.gpu cannot run here (no Docker engine), so their
consistency with the code is checked by reading them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_production_topology() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "minio", "minio-bucket", "migrate", "api", "worker"} <= set(
        services
    )
    assert services["migrate"]["entrypoint"] == ["lathe", "migrate"]
    assert services["api"]["entrypoint"][:2] == ["lathe", "serve"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_compose_sets_only_settings_the_code_reads() -> None:
    known = {f"LATHE_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "worker", "migrate"):
        env = compose()["services"][name]["environment"]
        lathe_vars = {k for k in env if k.startswith("LATHE_")}
        assert lathe_vars <= known, lathe_vars - known
        assert env["LATHE_BROKER_URL"].startswith("redis://redis:")
        assert env["LATHE_STORAGE_URL"].startswith("s3://")


def test_dockerfile_builds_the_worker_with_the_pinned_torch() -> None:
    dockerfile = (ROOT / "Dockerfile.gpu").read_text()
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_pin = next(d for d in pins["optional-dependencies"]["worker"] if d.startswith("torch"))
    assert re.search(r"^FROM nvidia/cuda:", dockerfile, re.M)
    assert f"pip install {torch_pin}" in dockerfile
    assert "'.[worker]'" in dockerfile
    assert 'ENTRYPOINT ["lathe", "worker"]' in dockerfile


def test_the_api_process_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from app.main import create_app; import app.cli; create_app(); "
        "bad = {'torch', 'transformers', 'peft', 'bitsandbytes'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=ROOT,
        env={"LATHE_HOME": str(tmp_path), "PATH": ""},
    )


def test_compose_runs_flower_on_the_broker_and_json_logs() -> None:
    services = compose()["services"]
    flower = services["flower"]
    image, _, tag = flower["image"].partition(":")
    assert image == "mher/flower" and tag and tag != "latest"  # pinned
    broker = services["api"]["environment"]["LATHE_BROKER_URL"]
    assert f"--broker={broker}" in flower["command"]  # the queues the workers consume
    assert "flower" in flower["command"] and "--port=5555" in flower["command"]
    assert "5555:5555" in flower["ports"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH")
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("api", "worker", "migrate"):
        assert services[name]["environment"]["LATHE_LOG_FORMAT"] == "json"


def test_prometheus_scrapes_the_api_metrics() -> None:
    prometheus = compose()["services"]["prometheus"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["api:8000"]
    # The dashboard's structure (its metric names are checked against a live /metrics in
    # tests/api/test_metrics.py).
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "lathe-dashboard.json").read_text())
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])
