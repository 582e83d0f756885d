"""Exports on the production topology (Postgres, Redis, S3, a real `lathe worker`): a job
trained on the tiny Llama with a SentencePiece vocabulary, then written out by the pool as
merged weights and as GGUF, from the job and from a checkpoint; the files downloaded
through the files API (one resumed with HTTP Range) and run in plain transformers and in
llama.cpp; a running export cancelled; another team kept out.

The tolerances are docs/exports.md's."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from app.compat import tarfile  # filter="data" on Python 3.11.2 too
from app.migrate import upgrade
from tests.conftest import create_team_key, serve_in_thread
from tests.e2e.conftest import start_worker, stop_worker, wait_for, wait_ready
from worker.training.tiny_sp_model import TINY_SP_LLAMA, build_tiny_llama_sp

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[2] / "app" / "data"
FINAL = {"succeeded", "failed", "cancelled"}
# A bfloat16 merge into the NF4-dequantized weights: the trained model up to bfloat16's own
# rounding of each weight (docs/exports.md: 0.059 measured on the tiny model).
MERGED_BFLOAT16_TOLERANCE = 0.1
HELD_OUT = [
    [{"role": "user", "content": "What is the boiling point of water at sea level?"}],
    [{"role": "user", "content": "Name a prime number between 10 and 20."}],
]


@pytest.fixture(scope="module")
def topology(
    stack_env: dict[str, str], postgres_server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """The API and one worker on a database and broker of their own, offering the tiny
    SentencePiece Llama; a client for each of two teams."""
    model_dir = build_tiny_llama_sp(tmp_path_factory.mktemp("models") / TINY_SP_LLAMA)
    url = postgres_server.create_database("lathe_exports")
    upgrade(url)
    env = {
        **stack_env,
        "LATHE_DATABASE_URL": url,
        "LATHE_BROKER_URL": stack_env["LATHE_BROKER_URL"][:-1] + "4",
        "LATHE_GPU_CLASSES": "{}",
        "LATHE_HEARTBEAT_SECONDS": "0.5",
        "LATHE_SCHEDULER_INTERVAL_SECONDS": "0.2",
        "LATHE_CHECKPOINT_EVERY_STEPS": "2",
        "LATHE_BASE_MODELS": json.dumps([{"name": TINY_SP_LLAMA, "path": str(model_dir)}]),
        # Small shards, so the merged folder (about 280 kB) is several files with an index.
        "LATHE_EXPORT_SHARD_BYTES": str(100_000),
    }
    log_path = tmp_path_factory.mktemp("export-worker") / "worker.log"
    worker = start_worker(env, "cpu-export", "export@e2e", 4.0, log_path)
    try:
        wait_ready(worker, log_path)
        with serve_in_thread(env) as api:
            clients = {
                team: httpx.Client(
                    base_url=api,
                    headers={"Authorization": f"Bearer {create_team_key(env, team)[1]}"},
                    timeout=60,
                )
                for team in ("exporters", "others")
            }
            yield {"env": env, "model_dir": model_dir, **clients}
            for client in clients.values():
                client.close()
    finally:
        stop_worker(worker)
        postgres_server.drop_database(url)


def ok(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_until_final(client: httpx.Client, path: str) -> dict:
    def finished():
        body = ok(client.get(path))
        return body if body["status"] in FINAL else None

    return wait_for(finished, 400, what=f"{path} to finish")


@pytest.fixture(scope="module")
def trained(topology) -> dict:
    """A finished job on the SentencePiece model, with checkpoints."""
    client = topology["exporters"]
    with (DATA / "sample_chat.jsonl").open("rb") as data:
        training_file = ok(
            client.post("/v1/files", files={"file": data}, data={"purpose": "fine-tune"})
        )["id"]
    job = ok(
        client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": TINY_SP_LLAMA,
                "training_file": training_file,
                "hyperparameters": {"n_epochs": 1, "batch_size": 8},
                "seed": 3,
                "max_seq_length": 256,
            },
        )
    )
    job = wait_until_final(client, f"/v1/fine_tuning/jobs/{job['id']}")
    assert job["status"] == "succeeded", job["error"]
    return job


def export(client: httpx.Client, job_id: str, **body) -> dict:
    created = ok(client.post(f"/v1/fine_tuning/jobs/{job_id}/exports", json=body))
    assert created["status"] == "queued"
    return created


def run_export(client: httpx.Client, job_id: str, **body) -> dict:
    created = export(client, job_id, **body)
    done = wait_until_final(client, f"/v1/fine_tuning/jobs/{job_id}/exports/{created['id']}")
    assert done["status"] == "succeeded", done["error"]
    return done


def download(client: httpx.Client, export: dict, folder: Path) -> Path:
    """Every file of the export into `folder` under its name."""
    folder.mkdir()
    for file in export["files"]:
        content = client.get(f"/v1/files/{file['id']}/content").content
        assert len(content) == file["bytes"] == ok(client.get(f"/v1/files/{file['id']}"))["bytes"]
        (folder / file["filename"]).write_bytes(content)
    return folder


def adapter_of(client: httpx.Client, job: dict, target: Path) -> Path:
    names = {ok(client.get(f"/v1/files/{f}"))["filename"]: f for f in job["result_files"]}
    archive = client.get(f"/v1/files/{names['adapter.tar.gz']}/content").content
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def prompts(model_dir: Path) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [
        tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        for chat in HELD_OUT
    ]


@torch.no_grad()
def trained_logits(base_dir: Path, adapter: Path) -> list[torch.Tensor]:
    """What the job's model computes: the 4-bit base with the adapter on top."""
    from peft import PeftModel

    from worker.training.qlora_model import load_quantized_base
    from worker.training.spec import QuantSpec

    model = PeftModel.from_pretrained(load_quantized_base(base_dir, QuantSpec(), "cpu"), adapter)
    return [model.eval()(ids).logits.float() for ids in prompts(base_dir)]


@torch.no_grad()
def merged_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_a_merged_export_is_the_trained_model_in_plain_transformers(
    topology, trained, tmp_path: Path
) -> None:
    client = topology["exporters"]
    done = run_export(client, trained["id"], format="merged", dtype="bfloat16")

    names = {f["filename"] for f in done["files"]}
    assert {"config.json", "model.safetensors.index.json", "tokenizer_config.json"} <= names
    assert sum(name.endswith(".safetensors") for name in names) >= 2
    folder = download(client, done, tmp_path / "merged")
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config

    model = merged_model(folder)  # no Lathe code, no peft
    reference = trained_logits(topology["model_dir"], adapter_of(client, trained, tmp_path / "a"))
    for ids, expected in zip(prompts(folder), reference, strict=True):
        difference = (model(ids).logits.float() - expected).abs().max().item()
        assert difference < MERGED_BFLOAT16_TOLERANCE, difference
    events = ok(client.get(f"/v1/fine_tuning/jobs/{trained['id']}/exports/{done['id']}/events"))
    messages = [e["message"] for e in events["data"]]
    assert messages[0].startswith("Export complete:")
    assert any(m.startswith("Merged the adapter into 14 base weights") for m in messages)


def test_a_gguf_export_decodes_in_llama_cpp_as_the_merged_model_does(
    topology, trained, tmp_path: Path
) -> None:
    from llama_cpp import Llama

    client = topology["exporters"]
    merged = download(
        client,
        run_export(client, trained["id"], format="merged", dtype="float16"),
        tmp_path / "merged",
    )
    done = run_export(client, trained["id"], format="gguf", quantization="f16")

    events = client.get(f"/v1/fine_tuning/jobs/{trained['id']}/exports/{done['id']}/events")
    assert any(e["message"].startswith("Converted to GGUF f16") for e in ok(events)["data"])
    # The merged folder carries the SentencePiece model: no tokenizer warning.
    assert not [e for e in ok(events)["data"] if e["level"] != "info"]
    folder = download(client, done, tmp_path / "gguf")
    (gguf,) = folder.glob("*.gguf")
    modelfile = (folder / "Modelfile").read_text()
    assert f"FROM ./{gguf.name}" in modelfile and "<|im_start|>" in modelfile
    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=2, verbose=False, seed=0)
    model = merged_model(merged)
    for ids in prompts(merged):
        expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
        llm.reset()
        got = []
        for token in llm.generate(ids[0].tolist(), temp=0.0, top_k=1, reset=True):
            got.append(token)
            if len(got) == len(expected):
                break
        assert got == expected.tolist()


def test_a_checkpoint_exports_its_own_adapter(topology, trained, tmp_path: Path) -> None:
    client = topology["exporters"]
    checkpoints = ok(client.get(f"/v1/fine_tuning/jobs/{trained['id']}/checkpoints"))["data"]
    first = min(checkpoints, key=lambda c: c["step_number"])

    done = run_export(client, trained["id"], format="merged", checkpoint=first["id"])

    assert (done["checkpoint_id"], done["step_number"]) == (first["id"], first["step_number"])
    assert done["model"] == first["fine_tuned_model_checkpoint"]
    folder = download(client, done, tmp_path / "step")
    final = download(client, run_export(client, trained["id"], format="merged"), tmp_path / "final")
    ids = prompts(folder)[0]
    # The step's weights, not the final ones: the two models differ.
    assert not torch.allclose(merged_model(folder)(ids).logits, merged_model(final)(ids).logits)


def test_a_running_export_is_cancelled_and_publishes_nothing(topology, trained) -> None:
    client = topology["exporters"]
    files_before = {f["id"] for f in ok(client.get("/v1/files?limit=100"))["data"]}
    created = export(client, trained["id"], format="gguf", quantization="q4_k_m")
    path = f"/v1/fine_tuning/jobs/{trained['id']}/exports/{created['id']}"

    def merged():  # running, its converter under way
        messages = [e["message"] for e in ok(client.get(f"{path}/events"))["data"]]
        return any(m.startswith("Merged the adapter") for m in messages)

    wait_for(merged, 120, what="the export to reach its conversion")
    cancelled = ok(client.post(f"{path}/cancel"))

    assert cancelled["status"] == "cancelled"
    assert wait_until_final(client, path)["files"] == []
    # The worker's slot frees: the next export runs to the end.
    run_export(client, trained["id"], format="merged")
    files_after = {f["id"] for f in ok(client.get("/v1/files?limit=100"))["data"]}
    new = files_after - files_before
    assert not any(ok(client.get(f"/v1/files/{f}"))["filename"].endswith(".gguf") for f in new)


def test_another_team_sees_no_export_and_a_download_resumes_with_range(topology, trained) -> None:
    client, other = topology["exporters"], topology["others"]
    done = run_export(client, trained["id"], format="merged")
    path = f"/v1/fine_tuning/jobs/{trained['id']}/exports/{done['id']}"

    assert other.get(path).status_code == 404
    assert other.get(f"/v1/fine_tuning/jobs/{trained['id']}/exports").status_code == 404
    shard = max(done["files"], key=lambda f: f["bytes"])
    assert other.get(f"/v1/files/{shard['id']}/content").status_code == 404

    # A download cut off halfway, resumed from there, gives the whole file's SHA-256.
    content = f"/v1/files/{shard['id']}/content"
    half = shard["bytes"] // 2
    first = client.get(content, headers={"Range": f"bytes=0-{half - 1}"})
    rest = client.get(content, headers={"Range": f"bytes={half}-"})
    assert (first.status_code, rest.status_code) == (206, 206)
    assert len(first.content) == half
    whole = hashlib.sha256(client.get(content).content).hexdigest()
    assert hashlib.sha256(first.content + rest.content).hexdigest() == whole
