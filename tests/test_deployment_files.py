"""docker-compose.yml, Dockerfile.api and Dockerfile.gpu cannot run here (no Docker engine),
so their consistency with the code is checked by reading them, and by running here the
snippets of their RUN lines that can run anywhere."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pin(requirements: list[str], name: str) -> str:
    """The exact version `requirements` pin `name` to (a pin is `name==version`)."""
    (version,) = [
        str(r.specifier).removeprefix("==")
        for r in map(Requirement, requirements)
        if canonicalize_name(r.name) == canonicalize_name(name)
    ]
    assert re.fullmatch(r"[0-9][0-9A-Za-z.+]*", version), f"{name} is not pinned: {version}"
    return version


def test_compose_has_the_production_topology() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "minio", "minio-bucket", "migrate", "api", "worker"} <= set(
        services
    )
    assert services["migrate"]["command"] == ["migrate"]  # the API image's entrypoint: lathe
    assert services["api"]["command"][0] == "serve"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_compose_runs_the_api_on_its_own_image_and_only_the_worker_on_the_gpu_image() -> None:
    services = compose()["services"]
    built = {name: s["build"]["dockerfile"] for name, s in services.items() if "build" in s}
    assert built == {
        "migrate": "Dockerfile.api",
        "api": "Dockerfile.api",
        "worker": "Dockerfile.gpu",
    }
    for name in built:
        assert services[name]["build"]["context"] == "."
    # One tag per image, so that migrate and api share one build.
    assert services["migrate"]["image"] == services["api"]["image"] != services["worker"]["image"]
    assert [n for n, s in services.items() if "deploy" in s] == ["worker"]  # the GPU reservation
    # The worker's caches are on the volume, under the image's home, which its user owns.
    volume = services["worker"]["volumes"][0]
    assert volume.split(":")[1] == "/var/lib/lathe/models"
    for variable in ("LATHE_MODEL_CACHE_DIR", "HF_HOME"):
        assert services["worker"]["environment"][variable].startswith("/var/lib/lathe/models/")
    made = dockerfile("Dockerfile.gpu").command("mkdir -p /var/lib/lathe/models/cache")
    assert made.split()[2:] == [
        "/var/lib/lathe/models/cache",
        "/var/lib/lathe/models/hf",
        "/var/lib/lathe/models/triton",
    ]
    assert "chown -R lathe:lathe /var/lib/lathe" in dockerfile("Dockerfile.gpu").commands()


def test_compose_sets_only_settings_the_code_reads() -> None:
    known = {f"LATHE_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "worker", "migrate"):
        env = compose()["services"][name]["environment"]
        lathe_vars = {k for k in env if k.startswith("LATHE_")}
        assert lathe_vars <= known, lathe_vars - known
        assert env["LATHE_BROKER_URL"].startswith("redis://redis:")
        assert env["LATHE_STORAGE_URL"].startswith("s3://")
    for image in ("Dockerfile.api", "Dockerfile.gpu"):
        lathe_vars = {k for k in dockerfile(image).env() if k.startswith("LATHE_")}
        assert "LATHE_HOME" in lathe_vars and lathe_vars <= known, lathe_vars - known


# Dockerfiles, read as Docker reads them: continuation lines joined, comment lines dropped.


class Dockerfile:
    def __init__(self, name: str) -> None:
        self.name = name
        self.instructions: list[tuple[str, str]] = []
        current = ""
        for line in (ROOT / name).read_text().splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue  # also inside a continued instruction, as Docker does
            if stripped.endswith("\\"):
                current += stripped[:-1] + " "
                continue
            keyword, _, rest = (current + stripped).partition(" ")
            self.instructions.append((keyword.upper(), rest.strip()))
            current = ""
        assert not current, f"{name} ends inside an instruction"

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        return self.all(keyword)[-1]

    def args(self) -> dict[str, str]:
        return dict(a.partition("=")[::2] for a in self.all("ARG"))

    def env(self) -> dict[str, str]:
        return dict(w.partition("=")[::2] for e in self.all("ENV") for w in shlex.split(e))

    def run_text(self) -> str:
        return "\n".join(self.all("RUN"))

    def commands(self) -> list[str]:
        """Each RUN's commands, split at `&&`."""
        return [c.strip() for run in self.all("RUN") for c in run.split(" && ")]

    def command(self, start: str) -> str:
        (found,) = [c for c in self.commands() if c.startswith(start)]
        return found


def dockerfile(name: str) -> Dockerfile:
    return Dockerfile(name)


def run_snippet(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """One of a Dockerfile's RUN commands, run here by sh as the build would run it (an ARG
    is an environment variable to RUN), with this venv's python first on PATH."""
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    return subprocess.run(
        ["sh", "-c", command],
        cwd=cwd,
        env={"PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def requirements_written(image: Dockerfile, tmp_path: Path) -> list[str]:
    """The requirements file `image` writes from pyproject.toml before installing it."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    command = image.command('python -c "import tomllib;')
    written = tmp_path / "requirements.txt"
    done = run_snippet(command.replace("/tmp/requirements.txt", str(written)), tmp_path)
    assert done.returncode == 0, done.stderr
    return written.read_text().splitlines()


# The CUDA release of each torch that pyproject.toml may pin, as PyPI's Linux x86_64 wheel of
# it is built (its metadata requires cuda-toolkit==13.0.3 for 2.13.0). A new torch pin fails
# here until its CUDA build is looked up and written down; Dockerfile.gpu's base image and
# TORCH_CUDA follow it.
TORCH_CUDA_BUILDS = {"2.13.0": "13.0"}
# The Python each image's base brings (Ubuntu 24.04's python3 is 3.12).
BASE_PYTHONS = {"ubuntu24.04": "3.12"}
# The GPU kernels the worker trains with on CUDA (worker/training/liger.py): in the image,
# pinned.
GPU_KERNELS = ("liger-kernel",)
CONSTRAINTS = "-c /opt/lathe/torch-constraints.txt"


def test_the_gpu_image_has_the_cuda_build_of_the_pinned_torch() -> None:
    gpu = dockerfile("Dockerfile.gpu")
    torch = pin(project()["optional-dependencies"]["worker"], "torch")
    cuda = TORCH_CUDA_BUILDS[torch]
    (base,) = gpu.all("FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-base-(ubuntu\d+\.\d+)", base)
    assert match, base
    assert match[1] == cuda  # the toolkit's driver check matches what torch needs
    assert gpu.args()["TORCH_CUDA"] == cuda
    # torch first and alone, then everything else held to the torch it installed.
    installs = [c for c in gpu.commands() if c.startswith(("pip install", "CMAKE_ARGS"))]
    assert installs[0] == f"pip install torch=={torch}"
    assert all(CONSTRAINTS in c for c in installs[1:]), installs
    assert gpu.command("pip freeze") == (
        "pip freeze | grep -iE '^(torch|triton|nvidia-|cuda-)' >/opt/lathe/torch-constraints.txt"
    )


@pytest.mark.parametrize(("built_for", "fails"), [("13.0", False), ("12.8", True), ("", True)])
def test_the_gpu_image_build_stops_on_another_torch_build(
    tmp_path: Path, built_for: str, fails: bool
) -> None:
    """The build's own check, run here against a stand-in torch built for `built_for` (""
    is the CPU build, whose torch.version.cuda is None)."""
    gpu = dockerfile("Dockerfile.gpu")
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import types\n__version__ = '2.13.0'\n"
        f"version = types.SimpleNamespace(cuda={built_for or None!r})\n"
    )
    check = gpu.command('python -c "import sys, torch;')
    done = run_snippet(
        check, tmp_path, TORCH_CUDA=gpu.args()["TORCH_CUDA"], PYTHONPATH=str(tmp_path)
    )
    assert (done.returncode != 0) == fails, done.stderr
    if fails:
        assert f"built for CUDA {built_for or None}, not 13.0" in done.stderr


def test_the_gpu_image_installs_the_worker_extra_with_the_kernels_pinned(tmp_path: Path) -> None:
    gpu = dockerfile("Dockerfile.gpu")
    extras = project()["optional-dependencies"]
    # Every extra but the developers' is the worker's (a `gpu` extra would be installed too).
    installed = set(re.findall(r"\['optional-dependencies'\]\['(\w+)'\]", gpu.run_text()))
    assert installed == set(extras) - {"dev"}
    assert "worker" in installed
    editable = gpu.command(f"pip install {CONSTRAINTS} --no-deps")
    assert editable == f"pip install {CONSTRAINTS} --no-deps -e '.[{','.join(sorted(installed))}]'"
    pinned = [r for name in sorted(installed) for r in extras[name]]
    assert requirements_written(gpu, tmp_path) == project()["dependencies"] + pinned
    for kernel in GPU_KERNELS:
        pin(pinned, kernel)  # exactly pinned, in an extra the image installs
    # The build fails if any of them does not import.
    assert gpu.commands()[-1].startswith('python -c "import torch, bitsandbytes, liger_kernel,')


def test_the_gpu_image_keeps_llama_cpp_s_converter_and_a_portable_build(tmp_path: Path) -> None:
    gpu = dockerfile("Dockerfile.gpu")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    sed = re.search(r"version=\$\((sed .*? pyproject\.toml)\)", gpu.run_text())
    assert sed
    done = run_snippet(sed[1], tmp_path)
    worker = project()["optional-dependencies"]["worker"]
    assert done.stdout.strip() == pin(worker, "llama-cpp-python")
    assert "share/llama.cpp" in gpu.run_text() and "convert_hf_to_gguf.py" in gpu.run_text()
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF"' in gpu.run_text()
    assert gpu.env()["VIRTUAL_ENV"] == "/opt/lathe"  # app.config's llama_cpp_dir: sys.prefix
    assert gpu.last("ENTRYPOINT") == '["lathe", "worker"]'


API_IMAGE_FORBIDDEN = re.compile(
    r"torch|cuda|nvidia|bitsandbytes|llama|liger|triton|optional-dependencies|\[worker|worker",
    re.I,
)


def test_the_api_image_is_slim_python_without_torch_or_cuda(tmp_path: Path) -> None:
    api = dockerfile("Dockerfile.api")
    (base,) = api.all("FROM")
    match = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim-\w+", base)  # pinned to a release
    assert match, base
    gpu_base = dockerfile("Dockerfile.gpu").all("FROM")[0]
    assert match[1] == BASE_PYTHONS[gpu_base.rpartition("-")[2]]  # one Python for both
    for keyword, rest in api.instructions:
        assert not API_IMAGE_FORBIDDEN.search(rest), (keyword, rest)
    assert requirements_written(api, tmp_path) == project()["dependencies"]
    assert "pip install --only-binary :all: -r /tmp/requirements.txt" in api.commands()
    assert "pip install --no-deps -e ." in api.commands()
    assert api.last("ENTRYPOINT") == '["lathe"]'
    assert json.loads(api.last("CMD")) == compose()["services"]["api"]["command"]
    assert api.env()["LATHE_HOME"] == "/var/lib/lathe"


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.gpu"])
def test_the_images_run_as_an_unprivileged_user(name: str) -> None:
    image = dockerfile(name)
    assert image.last("USER") == "lathe"
    uid = int(image.args()["LATHE_UID"])
    assert uid == 10001  # fixed, the same in both images, and not a distribution's own user
    assert re.search(
        r"useradd --uid \"\$LATHE_UID\" --gid lathe --home-dir /var/lib/lathe ", image.run_text()
    )
    assert "chown" in image.run_text()
    # Nothing runs after the switch that would need root, and the venv stays root's.
    assert [kw for kw, _ in image.instructions].index("USER") > max(
        i for i, (kw, _) in enumerate(image.instructions) if kw == "RUN"
    )
    for service in compose()["services"].values():
        assert "user" not in service


# The API image holds Lathe without its worker extra. Its processes (serve, migrate, scheduler,
# admin) must work with only that: the dependency closure of Lathe's own requirements.


def dependency_closure(root: str) -> set[str]:
    """Canonical names of `root`'s distribution and those it requires, with their requested
    extras, as installed here (markers evaluated for this Python)."""
    seen: dict[str, frozenset[str]] = {}
    todo = [(root, frozenset[str]())]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in seen and extras <= seen[key]:
            continue
        seen[key] = seen.get(key, frozenset()) | extras
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:  # an optional dependency nothing installed
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {*extras, ""}):
                todo.append((req.name, frozenset(req.extras)))
    return set(seen)


def modules_outside_the_api_image() -> set[str]:
    """Top-level modules installed here that the API image does not have."""
    allowed = dependency_closure("lathe")
    assert {"fastapi", "sqlalchemy", "celery", "boto3"} <= allowed
    assert not {"torch", "transformers", "bitsandbytes", "llama-cpp-python"} & allowed
    outside = {
        module
        for module, dists in metadata.packages_distributions().items()
        if not any(canonicalize_name(d) in allowed for d in dists)
    }
    return (outside - set(sys.stdlib_module_names)) | {"worker"}  # Dockerfile.api has no worker/


def imported_top_level(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_api_image_s_code_imports_only_what_the_image_has() -> None:
    """Every module Dockerfile.api copies, lazy imports included; the one exception is the
    `lathe worker` command, which the API image does not run."""
    outside = modules_outside_the_api_image()
    assert {"torch", "transformers", "peft", "numpy", "llama_cpp", "worker"} <= outside
    found = {
        str(path.relative_to(ROOT)): imported_top_level(path) & outside
        for package in ("app", "migrations")
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in found.items() if names} == {"app/cli.py": {"worker"}}


API_IMAGE_PROCESSES = """
import json, sys
from importlib.abc import MetaPathFinder

OUTSIDE = set(json.loads(sys.argv[1]))
AT_START = set(sys.modules)  # site's own (setuptools' _distutils_hack .pth), not the API's


class NotInTheImage(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OUTSIDE:
            raise ModuleNotFoundError(f"{name} is not in the API image", name=name)
        return None


sys.meta_path.insert(0, NotInTheImage())

from fastapi.testclient import TestClient

from app.background import run_forever  # lathe scheduler
from app.broker import make_celery
from app.cli import app as cli
from app.config import get_settings
from app.db import make_engine, make_sessionmaker
from app.main import create_app
from app.services.scheduler import schedule_once

cli(["migrate"], standalone_mode=False)
cli(["admin", "create-team", "image-check"], standalone_mode=False)
settings = get_settings()
schedule_once(make_sessionmaker(make_engine(settings.resolved_database_url)), settings,
              make_celery(settings))
with TestClient(create_app()) as client:
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert client.get("/v1/models").status_code == 401
loaded = OUTSIDE & {name.split(".")[0] for name in set(sys.modules) - AT_START}
assert not loaded, loaded
print("api image ok")
"""


def test_the_api_runs_on_the_api_image_s_packages_alone(tmp_path: Path) -> None:
    """migrate, admin, a scheduler pass and the app's requests, with every module the API
    image lacks made unimportable (torch among them)."""
    outside = sorted(modules_outside_the_api_image())
    done = subprocess.run(
        [sys.executable, "-c", API_IMAGE_PROCESSES, json.dumps(outside)],
        cwd=ROOT,
        env={"LATHE_HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "api image ok" in done.stdout


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
