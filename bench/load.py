"""Load test: many clients at once against `lathe serve` (`make bench-load`; docs/benchmarks.md).

Two runs, each against a real server process on 127.0.0.1:

- postgres: `lathe serve` on Postgres, Redis and S3 (moto), with a `lathe worker` training
  jobs meanwhile; 500 clients: 200 keep event streams open (GET .../events?stream=true,
  each held 15-45 s, then reopened), 300 send job GETs, job and file lists, event pages and
  uploads with a random pause (mean --think seconds) between requests.
- sqlite: the embedded default (`lathe serve` with nothing configured: SQLite, a local
  object directory, its own worker process), 100 clients in the same proportions.

Clients belong to teams of ten (the per-key rate limit stays on; a 429 is counted, not a
failure). A prober of its own times GET /healthz every 200 ms. A run passes when no
request got a 5xx or a transport error and /healthz's p99 is under 1 s in every 10 s window.
Per operation: requests, statuses, p50/p95/p99/max; results in bench/results/load-RUN.json.

The backing services are throwaway ones started here (Postgres through tests/bin/pg_ctl,
redis-server, moto_server), on free loopback ports; every loop stops at the deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.run import ensure_database, free_port

try:
    import uvloop  # uvicorn's (uvicorn[standard]): a cheaper driver leaves more CPU to the API
except ImportError:  # pragma: no cover
    uvloop = None

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "app" / "data" / "sample_chat_valid.jsonl"
RESULTS = ROOT / "bench" / "results"
PG_CTL = ROOT / "tests" / "bin" / "pg_ctl"
HOST = "127.0.0.1"
WINDOW_S = 10.0  # /healthz p99 is judged per window of this many seconds
HEALTHZ_P99_LIMIT_S = 1.0
CLIENTS_PER_TEAM = 10
S3_CREDENTIALS = {  # moto's: any will do
    "aws_access_key_id": "load",
    "aws_secret_access_key": "load",
    "region_name": "us-east-1",
}
IDLE_CLASS = "bench-idle"  # declared, never served: its jobs stay queued, their streams open
# Request mix of the non-streaming clients (weights).
MIX = {"job_get": 40, "event_page": 25, "job_list": 15, "file_list": 15, "upload": 5}


def wait_until(check, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- backing services ----------------------------------------------------------------------


@contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL server (the tests' pg_ctl shim); the URL of a fresh database."""
    datadir, log = workdir / "pgdata", workdir / "postgres.log"
    port = free_port()
    subprocess.run(
        [str(PG_CTL), "initdb", "-D", str(datadir), "-o", "--auth=trust --username=postgres"],
        check=True,
        capture_output=True,
    )
    options = f"-F -p {port} -c listen_addresses={HOST} -c unix_socket_directories=/tmp"
    options += " -c max_connections=200"
    subprocess.run(
        [str(PG_CTL), "start", "-D", str(datadir), "-o", options, "-l", str(log), "-w"],
        check=True,
        capture_output=True,
    )
    try:
        url = f"postgresql+psycopg://postgres@{HOST}:{port}/lathe_load"
        ensure_database(url)
        yield url
    finally:
        subprocess.run(
            [str(PG_CTL), "stop", "-D", str(datadir), "-m", "fast"],
            check=False,
            capture_output=True,
        )


@contextmanager
def redis(workdir: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--bind", HOST, "--port", str(port), "--save", "", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    try:
        import redis as redis_client

        def up() -> bool:
            try:
                return bool(redis_client.Redis(host=HOST, port=port).ping())
            except redis_client.ConnectionError:
                return False

        wait_until(up, 30, "redis-server")
        yield f"redis://{HOST}:{port}/0"
    finally:
        stop(proc, 10)


@contextmanager
def s3() -> Iterator[tuple[str, str]]:
    """moto's S3 server in a process of its own (not this one: the driver needs its CPU)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://{HOST}:{port}"
    try:
        wait_until(lambda: http_ok(f"{endpoint}/moto-api/"), 60, "moto_server")
        import boto3

        bucket = f"lathe-load-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, **S3_CREDENTIALS).create_bucket(Bucket=bucket)
        yield endpoint, bucket
    finally:
        stop(proc, 10)


# --- Lathe ----------------------------------------------------------------------------------


@contextmanager
def lathe_serve(env: dict[str, str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", HOST, "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{HOST}:{port}"
    try:
        wait_until(lambda: proc.poll() is None and http_ok(f"{url}/readyz"), 120, "lathe serve")
        yield url, proc
    finally:
        stop(proc)


@contextmanager
def lathe_worker(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--gpu-class", "cpu", "--memory-gb", "8"]
            + ["--name", "bench-load"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: b" ready." in log_path.read_bytes(), 120, "lathe worker")
        yield proc
    finally:
        stop(proc)


def create_teams(database_url: str, count: int) -> list[str]:
    """`count` new teams; their API keys."""
    from app.db import make_engine, make_sessionmaker
    from app.services.teams import create_team

    engine = make_engine(database_url)
    keys = []
    with make_sessionmaker(engine)() as session:
        for _ in range(count):
            _, key = create_team(session, f"load-{uuid.uuid4().hex[:10]}")
            keys.append(key)
    engine.dispose()
    return keys


@dataclass
class Team:
    key: str
    file_id: str = ""
    jobs: list[str] = field(default_factory=list)  # queued on IDLE_CLASS: streams stay open
    trained: list[str] = field(default_factory=list)  # for the worker: live events, then end


def prepare(url: str, keys: list[str], trained_jobs: int) -> list[Team]:
    teams = []
    for index, key in enumerate(keys):
        team = Team(key)
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as api:
            with DATASET.open("rb") as fh:
                resp = api.post(
                    "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", fh)}
                )
            resp.raise_for_status()
            team.file_id = resp.json()["id"]
            spec = {"model": "tiny-random-llama", "training_file": team.file_id}
            for _ in range(3):
                job = api.post("/v1/fine_tuning/jobs", json={**spec, "gpu_class": IDLE_CLASS})
                job.raise_for_status()
                team.jobs.append(job.json()["id"])
            if index < trained_jobs:
                small = {"hyperparameters": {"n_epochs": 1, "batch_size": 2}, "max_seq_length": 128}
                job = api.post("/v1/fine_tuning/jobs", json={**spec, **small})
                job.raise_for_status()
                team.trained.append(job.json()["id"])
        teams.append(team)
    return teams


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Record:
    samples: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    healthz: list[tuple[float, float]] = field(default_factory=list)  # (at, seconds)
    stream_events: int = 0
    streams_open: int = 0
    streams_open_max: int = 0

    def add(self, op: str, outcome: str, seconds: float | None) -> None:
        self.statuses[op][outcome] += 1
        if seconds is not None:
            self.samples[op].append(seconds)


async def request_client(
    api: httpx.AsyncClient, team: Team, record: Record, deadline: float, think: float
) -> None:
    ops, weights = list(MIX), list(MIX.values())
    auth = {"Authorization": f"Bearer {team.key}"}
    body = DATASET.read_bytes()
    await asyncio.sleep(random.uniform(0, 5))  # ramp up over the first 5 s
    while time.monotonic() < deadline:
        op = random.choices(ops, weights)[0]
        job_id = random.choice(team.jobs + team.trained)
        started = time.monotonic()
        try:
            if op == "job_get":
                resp = await api.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth)
            elif op == "event_page":
                resp = await api.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=20", headers=auth)
            elif op == "job_list":
                resp = await api.get("/v1/fine_tuning/jobs?limit=20", headers=auth)
            elif op == "file_list":
                resp = await api.get("/v1/files?limit=20", headers=auth)
            else:
                resp = await api.post(
                    "/v1/files",
                    headers=auth,
                    data={"purpose": "fine-tune"},
                    files={"file": ("train.jsonl", body)},
                )
            record.add(op, str(resp.status_code), time.monotonic() - started)
        except httpx.HTTPError as exc:
            record.add(op, f"error:{type(exc).__name__}", None)
        remaining = deadline - time.monotonic()
        await asyncio.sleep(min(random.uniform(0, 2 * think), max(remaining, 0)))


async def stream_client(
    api: httpx.AsyncClient, team: Team, record: Record, deadline: float
) -> None:
    auth = {"Authorization": f"Bearer {team.key}"}
    await asyncio.sleep(random.uniform(0, 5))
    while time.monotonic() < deadline:
        # Mostly queued jobs (the stream stays open); now and then a trained one (live
        # events, then `end` when it finishes).
        trained = team.trained and random.random() < 0.2
        job_id = random.choice(team.trained if trained else team.jobs)
        hold = min(random.uniform(15, 45), deadline - time.monotonic())
        started = time.monotonic()
        opened = False
        try:
            async with asyncio.timeout(max(hold, 0)):
                async with api.stream(
                    "GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true", headers=auth
                ) as resp:
                    record.add("stream_open", str(resp.status_code), time.monotonic() - started)
                    opened = resp.status_code == 200
                    if opened:
                        record.streams_open += 1
                        record.streams_open_max = max(record.streams_open_max, record.streams_open)
                    async for line in resp.aiter_lines():
                        if line.startswith("event: fine_tuning.job.event"):
                            record.stream_events += 1
        except TimeoutError:
            pass  # held as long as this client meant to: it closes and opens another
        except httpx.HTTPError as exc:
            op = "stream_read" if opened else "stream_open"
            record.add(op, f"error:{type(exc).__name__}", None)
        finally:
            if opened:
                record.streams_open -= 1
        if not opened:
            await asyncio.sleep(1)


def probe_healthz(url: str, duration: float, conn) -> None:
    """GET /healthz every 200 ms for `duration` s; send back [(at, seconds, outcome)].

    In a process of its own, so the driver's busy event loop does not delay the probe."""
    samples = []
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as probe:
        while (at := time.monotonic()) < started + duration:
            try:
                outcome = str(probe.get("/healthz").status_code)
            except httpx.HTTPError as exc:
                outcome = f"error:{type(exc).__name__}"
            took = time.monotonic() - at
            samples.append((at - started, took, outcome))
            time.sleep(max(0.2 - took, 0))
    conn.send(samples)
    conn.close()


def client_for(url: str, tls: ssl.SSLContext) -> httpx.AsyncClient:
    """One connection per simulated client, as a real one has (and no pool shared by
    hundreds of coroutines for httpx to scan at every request). The TLS context is shared:
    making one per client (loading the CA bundle) would take the driver seconds."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(30, read=60)  # a stream's keepalive comes every 15 s
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, verify=tls)


async def drive(
    url: str, teams: list[Team], clients: int, streams: int, duration: float, think: float
) -> Record:
    record = Record()
    tls = ssl.create_default_context()
    async with AsyncExitStack() as stack:
        apis = [await stack.enter_async_context(client_for(url, tls)) for _ in range(clients)]
        context = multiprocessing.get_context("spawn")
        receive, send = context.Pipe(duplex=False)
        prober = context.Process(target=probe_healthz, args=(url, duration, send), daemon=True)
        prober.start()
        started = time.monotonic()  # the clock starts once every client exists
        deadline = started + duration
        tasks = []
        every = max(clients // max(streams, 1), 1)
        for i, api in enumerate(apis):
            team = teams[(i // CLIENTS_PER_TEAM) % len(teams)]
            if streams > 0 and i % every == 0:
                streams -= 1
                tasks.append(asyncio.create_task(stream_client(api, team, record, deadline)))
            else:
                tasks.append(
                    asyncio.create_task(request_client(api, team, record, deadline, think))
                )
        # Every loop ends by the deadline; a stuck request is bounded by its timeout.
        await asyncio.wait_for(asyncio.gather(*tasks), duration + 120)
    samples = await asyncio.to_thread(receive.recv)
    prober.join(timeout=30)
    for at, took, outcome in samples:
        record.add("healthz", outcome, took)
        record.healthz.append((at, took))
    return record


# --- figures --------------------------------------------------------------------------------


def percentiles(samples: list[float]) -> dict:
    if not samples:
        return {}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(int(len(ordered) * q), len(ordered) - 1)] * 1000, 1)

    return {"p50_ms": at(0.5), "p95_ms": at(0.95), "p99_ms": at(0.99), "max_ms": at(1.0)}


def figures(record: Record, duration: float) -> dict:
    ops = {}
    for op in sorted(record.statuses):
        count = sum(record.statuses[op].values())
        ops[op] = {
            "requests": count,
            "per_s": round(count / duration, 1),
            "statuses": dict(sorted(record.statuses[op].items())),
            **percentiles(record.samples[op]),
        }
    windows = defaultdict(list)
    for at, took in record.healthz:
        windows[int(at // WINDOW_S)].append(took)
    window_p99 = {
        f"{int(w * WINDOW_S)}-{int((w + 1) * WINDOW_S)} s": percentiles(v)["p99_ms"]
        for w, v in sorted(windows.items())
    }
    server_errors = sum(
        n for s in record.statuses.values() for k, n in s.items() if k.startswith("5")
    )
    transport_errors = sum(
        n for s in record.statuses.values() for k, n in s.items() if k.startswith("error")
    )
    worst = max(window_p99.values(), default=float("inf"))
    return {
        "operations": ops,
        "healthz_p99_ms_per_window": window_p99,
        "healthz_worst_window_p99_ms": worst,
        "stream_events_received": record.stream_events,
        "streams_open_max": record.streams_open_max,
        "server_errors_5xx": server_errors,
        "transport_errors": transport_errors,
        "passed": server_errors == 0
        and transport_errors == 0
        and worst < HEALTHZ_P99_LIMIT_S * 1000,
    }


def machine() -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "nproc": run("nproc"),
        "lscpu": run("lscpu").splitlines()[:10],
        "free": run("free", "-h").splitlines(),
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its reaped children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])
    return round(ticks / os.sysconf("SC_CLK_TCK"), 1)


def markdown(name: str, result: dict) -> str:
    lines = [
        f"### {name}: {result['clients']} clients ({result['streams']} streaming), "
        f"{result['duration_s']:.0f} s",
        "",
        "| operation | requests | per s | statuses | p50 ms | p95 ms | p99 ms | max ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for op, f in result["operations"].items():
        statuses = ", ".join(f"{k}: {v}" for k, v in f["statuses"].items())
        lines.append(
            f"| {op} | {f['requests']} | {f['per_s']} | {statuses} | {f.get('p50_ms', '')} "
            f"| {f.get('p95_ms', '')} | {f.get('p99_ms', '')} | {f.get('max_ms', '')} |"
        )
    lines += [
        "",
        f"- 5xx: {result['server_errors_5xx']}, transport errors: {result['transport_errors']}; "
        f"/healthz worst 10 s window p99: {result['healthz_worst_window_p99_ms']} ms; "
        f"passed: {result['passed']}",
        f"- streams open at most at once: {result['streams_open_max']}; events received over "
        f"streams: {result['stream_events_received']}; API process CPU: "
        f"{result['api_cpu_s']} s in {result['duration_s']:.0f} s",
    ]
    return "\n".join(lines)


# --- the runs ---------------------------------------------------------------------------------


def run(name: str, clients: int, streams: int, duration: float, think: float) -> dict:
    """One run: its services, the server (and worker), the teams, the load, the figures."""
    workdir = Path(tempfile.mkdtemp(prefix=f"lathe-load-{name}-"))
    os.chmod(workdir, 0o755)  # the postgres user reaches its data directory inside
    base = {k: v for k, v in os.environ.items() if not k.startswith("LATHE_")}
    env = {
        **base,
        "LATHE_HOME": str(workdir / "home"),
        "LATHE_GPU_CLASSES": json.dumps({"cpu": 8, IDLE_CLASS: 80}),
        "LATHE_DEFAULT_QUOTAS__MAX_QUEUED_JOBS": "1000",
    }
    try:
        with ExitStack() as stack:
            if name == "postgres":
                database_url = stack.enter_context(postgres(workdir))
                endpoint, bucket = stack.enter_context(s3())
                env.update(
                    LATHE_DATABASE_URL=database_url,
                    LATHE_BROKER_URL=stack.enter_context(redis(workdir)),
                    LATHE_STORAGE_URL=f"s3://{bucket}/lathe",
                    LATHE_S3_ENDPOINT_URL=endpoint,
                    AWS_ACCESS_KEY_ID=S3_CREDENTIALS["aws_access_key_id"],
                    AWS_SECRET_ACCESS_KEY=S3_CREDENTIALS["aws_secret_access_key"],
                    AWS_DEFAULT_REGION=S3_CREDENTIALS["region_name"],
                )
                from app.migrate import upgrade

                upgrade(database_url)
            else:
                database_url = f"sqlite:///{workdir / 'home' / 'lathe.db'}"
            url, server = stack.enter_context(lathe_serve(env, workdir / "serve.log"))
            if name == "postgres":
                stack.enter_context(lathe_worker(env, workdir / "worker.log"))
            keys = create_teams(database_url, max(clients // CLIENTS_PER_TEAM, 1))
            teams = prepare(url, keys, trained_jobs=6)
            print(
                f"{name}: {len(teams)} teams ready (API pid {server.pid}); "
                f"{clients} clients for {duration:.0f} s",
                flush=True,
            )
            cpu_before = cpu_seconds(server.pid)
            load = drive(url, teams, clients, streams, duration, think)
            record = uvloop.run(load) if uvloop else asyncio.run(load)
            result = {
                "run": name,
                "clients": clients,
                "streams": streams,
                "duration_s": duration,
                "think_s": think,
                "api_cpu_s": round(cpu_seconds(server.pid) - cpu_before, 1),
                # Other work on the machine competes for its CPUs: the 1-minute load at the end.
                "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
                **figures(record, duration),
            }
            return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["postgres", "sqlite"])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load per run")
    parser.add_argument("--clients", type=int, default=500, help="postgres run (sqlite: a fifth)")
    parser.add_argument("--streams", type=int, default=200, help="postgres run (sqlite: a fifth)")
    parser.add_argument("--think", type=float, default=1.0, help="mean pause between requests (s)")
    args = parser.parse_args()
    plan = {
        "postgres": (args.clients, args.streams),
        "sqlite": (max(args.clients // 5, 1), args.streams // 5),
    }
    info = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = False
    for name, (clients, streams) in plan.items():
        if args.only not in (None, name):
            continue
        result = {**run(name, clients, streams, args.duration, args.think), "machine": info}
        (RESULTS / f"load-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(markdown(name, result), flush=True)
        failed |= not result["passed"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
