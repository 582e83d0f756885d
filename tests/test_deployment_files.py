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


# `make test` is the one command, on a fresh Debian 12 machine as on a laptop: the Makefile
# installs (as root) or names (otherwise) the system packages the suite needs. Its checks
# and apt-get are pointed at stand-ins here, so nothing is installed on this machine.


def make(*args: str, **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(ROOT), *args]
        + [f"{name}={value}" for name, value in variables.items()],
        capture_output=True,
        text=True,
        timeout=60,
    )


def fake_apt_get(tmp_path: Path, policy: Path) -> tuple[Path, Path]:
    """An apt-get that logs its arguments and the policy-rc.d in force when it runs."""
    log = tmp_path / "apt.log"
    script = tmp_path / "apt-get"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "apt-get $*" >>{log}\n'
        f'if [ -x {policy} ]; then echo "policy: $(tr "\\n" " " <{policy})" >>{log}; fi\n'
    )
    script.chmod(0o755)
    return script, log


PRESENT = sys.executable  # stands in for every binary that is there


def test_make_test_is_the_one_command_and_ci_runs_just_that() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: system-deps install$", makefile, re.M)
    assert re.search(r"^test-fast: system-deps install$", makefile, re.M)
    # The venv needs python3-venv first (Debian's python3 has no ensurepip without it).
    assert re.search(r"^\$\(VENV\)/\.installed: pyproject\.toml \| python-venv$", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [
        line.strip()
        for line in ci.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "make test"]


def test_system_deps_does_nothing_when_everything_is_there(tmp_path: Path) -> None:
    apt, log = fake_apt_get(tmp_path, tmp_path / "policy-rc.d")
    done = make(
        "system-deps",
        PG_CTL=PRESENT,
        REDIS_SERVER=PRESENT,
        CHROMIUM=PRESENT,
        PYTHON=sys.executable,
        APT_GET=str(apt),
        AS_ROOT="0",
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")
    assert not log.exists()


def test_system_deps_as_root_installs_what_is_missing_without_starting_services(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy-rc.d"
    apt, log = fake_apt_get(tmp_path, policy)
    done = make(
        "system-deps",
        PG_CTL="/nonexistent/pg_ctl",
        REDIS_SERVER=PRESENT,
        CHROMIUM="/nonexistent/chromium",
        PYTHON=sys.executable,
        APT_GET=str(apt),
        POLICY_RC_D=str(policy),
        AS_ROOT="0",
    )
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == [
        "apt-get update",
        "policy: #!/bin/sh exit 101 ",  # invoke-rc.d refuses every service start
        "apt-get install -y --no-install-recommends postgresql chromium",
        "policy: #!/bin/sh exit 101 ",
    ]
    assert not policy.exists()  # removed afterwards


def test_system_deps_elsewhere_prints_the_exact_command_and_fails(tmp_path: Path) -> None:
    apt, log = fake_apt_get(tmp_path, tmp_path / "policy-rc.d")
    done = make(
        "system-deps",
        PG_CTL=PRESENT,
        REDIS_SERVER="",  # not on PATH
        CHROMIUM="/nonexistent/chromium",
        PYTHON="false",  # a python3 that cannot `import ensurepip`: no python3-venv
        APT_GET="apt-get",
        AS_ROOT="",
    )
    assert done.returncode != 0
    assert (
        "sudo apt-get update && sudo apt-get install -y --no-install-recommends "
        "python3-venv redis-server chromium"
    ) in done.stderr
    assert not log.exists()


def test_debian_12_s_python3_is_supported() -> None:
    """Debian 12 ships Python 3.11.2; tarfile's extraction filters came in 3.11.4 and are
    taken from backports.tarfile before (app/compat.py)."""
    from packaging.specifiers import SpecifierSet

    from app.compat import tarfile

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "3.11.2" in SpecifierSet(project["requires-python"])
    assert "backports.tarfile==1.2.0; python_full_version < '3.11.4'" in project["dependencies"]
    assert hasattr(tarfile, "data_filter")
