"""`vtpu bench-llm` end to end at a tiny shape, its refusals, the numpy reference decoder it
shares with the suite's `qwen3_decode` workload, and that workload at the `tiny` size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vtpu import bench
from vtpu.bench import llm

REPO = Path(__file__).resolve().parents[2]


def _bench_llm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, VTPU_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "vtpu", "bench-llm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


TINY_RUN = ("--shape", "tiny", "--layers", "1", "--threads", "1", "--repeats", "1",
            "--decode-tokens", "2", "--agree-steps", "12", "--agree-steps-reference", "6",
            "--bandwidth-gib", "0.0625", "--no-llama-cpp")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    pytest.importorskip("transformers", reason="the model is written by transformers")
    model_dir = tmp_path_factory.mktemp("bench-llm") / "qwen3-tiny"
    proc = _bench_llm(*TINY_RUN, "--model-dir", str(model_dir), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(proc.stdout)
    return run, proc.stderr, model_dir


def test_bench_llm_measures_every_engine_and_metric(tiny_run: tuple[dict, str, Path]) -> None:
    run, stderr, model_dir = tiny_run
    names = ["vtpu fp32", "vtpu bf16", "vtpu int8", "transformers fp32", "transformers bf16"]
    assert list(run["results"]) == names
    assert run["threads"] == run["kernel_threads"] == 1
    assert run["shape"]["layers"] == 1 and run["shape"]["hidden"] == 64
    assert run["baseline"] == "transformers fp32"
    for name, row in run["results"].items():
        assert row["weight_bytes"] > 0 and row["kv_bytes_per_token"] > 0, name
        for metric in llm.METRICS:
            assert row[metric]["tokens_per_s"] > 0, (name, metric)
            assert len(row[metric]["seconds"]) == 1
        for metric in ("decode_b1", "decode_b4"):
            assert 0 < row[metric]["fraction_of_limit"], (name, metric)
            assert row[metric]["limit_tokens_per_s"] > 0
        if name != "transformers fp32":
            assert row["decode_b1"]["vs_transformers_fp32"] > 0
    # int8 holds a quarter of fp32's Linear weights (plus scales); bf16 half
    sizes = {n: run["results"][n]["weight_bytes"] for n in names[:3]}
    assert sizes["vtpu int8"] < sizes["vtpu bf16"] < sizes["vtpu fp32"]
    bw = run["bandwidth"]
    assert bw["gb_per_s"] > 0.5 and bw["gb_per_s_1t"] == bw["gb_per_s"]
    assert "bandwidth" in stderr and "timing" in stderr  # progress on stderr
    assert (model_dir / "config.json").exists()
    assert "not installed" in run["llama_cpp"] or "skipped" in run["llama_cpp"]


def test_bench_llm_agrees_with_transformers_fp32(tiny_run: tuple[dict, str, Path]) -> None:
    run = tiny_run[0]
    agree = run["agreement"]
    assert agree["_reference"]["name"] == "vtpu fp32"
    reference = agree["transformers fp32"]
    assert reference["steps"] == 6
    assert reference["top1_match"] == 1.0
    # fp32 against fp32: rounding only, far below the logits' own scale
    assert reference["max_abs_logit_err"] <= 1e-4 * max(1.0, agree["_reference"]["max_abs_logit"])
    for name in ("vtpu bf16", "vtpu int8", "transformers bf16"):
        assert agree[name]["steps"] == (12 if name.startswith("vtpu") else 6)
        assert 0.0 <= agree[name]["top1_match"] <= 1.0
        assert 0.0 < agree[name]["max_abs_logit_err"] < agree["_reference"]["max_abs_logit"]


def test_bench_llm_prints_a_table_with_every_row(tiny_run: tuple[dict, str, Path]) -> None:
    table = llm.format_table([tiny_run[0]])
    lines = table.splitlines()
    assert lines[0].startswith("Qwen3 random model, 1 layers, hidden 64")
    assert "CPU:" in lines[1]
    for name in ("vtpu fp32", "vtpu bf16", "vtpu int8", "transformers fp32", "transformers bf16"):
        row = next(line for line in lines if line.startswith(name))
        assert "%" in row, row  # its fraction of the bandwidth limit
    assert any(line.startswith("llama.cpp:") for line in lines)
    assert "read bandwidth" in table and "GB/s" in table


def test_bench_llm_reuses_its_model_and_refuses_another(tiny_run: tuple[dict, str, Path]) -> None:
    model_dir = tiny_run[2]
    shape = llm.shape_of("tiny", 1)
    assert llm.ensure_model(model_dir, shape, print) == "reused"
    with pytest.raises(llm.BenchError, match="num_hidden_layers is 1"):
        llm.ensure_model(model_dir, llm.shape_of("tiny", 2), print)
    proc = _bench_llm(*TINY_RUN[:2], "--layers", "3", "--model-dir", str(model_dir))
    assert proc.returncode == 2
    assert "holds another model" in proc.stderr and "Traceback" not in proc.stderr


def test_llama_cpp_reads_the_converted_weights_as_ours(tiny_run: tuple[dict, str, Path]) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional)")
    pytest.importorskip("gguf")
    model_dir = tiny_run[2]
    ours = llm.Ours(model_dir, "fp32", 128)
    prompt = list(range(10, 42))
    for qtype, tolerance in (("F32", 1e-3), ("Q8_0", 0.1)):
        path = llm.write_gguf(model_dir, model_dir / f"test-{qtype}.gguf", qtype)
        theirs = llm.LlamaCpp(path, qtype, 1, 128)
        agree = llm.agreement(ours, [(theirs, 8)], prompt, 8, lambda fraction: None)
        assert agree[theirs.name]["top1_match"] == 1.0, qtype
        assert agree[theirs.name]["max_abs_logit_err"] < tolerance, qtype


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--threads", "two"], "--threads must be integers"),
        (["--threads", "0"], "--threads must be positive"),
        (["--layers", "0"], "--layers must be at least 1"),
        (["--shape", "7b"], "invalid choice: '7b'"),
    ],
)
def test_bench_llm_rejects_bad_arguments_with_a_reason(args: list[str], message: str) -> None:
    proc = _bench_llm(*args, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_directory_that_is_not_a_model_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(llm.BenchError, match="not empty"):
        llm.ensure_model(tmp_path, llm.shape_of("tiny", 1), print)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("variant", ["tied, GQA 2:1", "untied, GQA 3:1, head_dim 16"])
def test_the_numpy_reference_decodes_as_transformers(tmp_path: Path, variant: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    shape = dict(llm.SHAPES["tiny"])
    if variant.startswith("untied"):
        shape.update(tie=False, heads=6, kv_heads=2, head_dim=16)  # head_dim != hidden / heads
    weights = llm.random_qwen3_weights(shape, 5)
    llm.write_qwen3(tmp_path, shape, weights)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    prompt = list(range(3, 15))
    tokens, logits = llm.ReferenceQwen3(weights, shape).greedy(prompt, 12)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    assert out.sequences[0, len(prompt) :].tolist() == tokens
    theirs = torch.stack(out.logits)[:, 0].numpy()
    assert np.abs(theirs - logits).max() <= 1e-4 * np.abs(theirs).max()
    assert len(set(tokens)) > 3  # greedy walks through the vocabulary, it does not echo


def test_the_decode_workload_matches_its_reference_at_tiny() -> None:
    from vtpu.bench import workloads  # noqa: F401  (registers the workloads)

    result = bench.run_workload("qwen3_decode", size="tiny", repeats=1)
    assert result["error"] is None, result["error"]
    assert result["correct"] is True, result.get("check_detail")
    assert result["speedup"] > 0 and result["baseline"].startswith("the same decoder")
    assert result["extras"]["tokens"] == 8 and result["extras"]["tokens_per_second"] > 0
    assert result["ops"] > 0 and result["ops_per_second"] > 0


def test_the_decode_workload_check_catches_a_wrong_token() -> None:
    from vtpu.bench import workloads

    case = workloads.Qwen3Decode().build(**workloads.Qwen3Decode.sizes["tiny"])
    tokens, logits = case.ours()
    assert case.check((tokens, logits)).correct
    wrong = [*tokens[:-1], (tokens[-1] + 1) % 1024]
    outcome = case.check((wrong, logits))
    assert not outcome.correct and "token 7 differs" in outcome.detail
    noisy = logits.copy()
    noisy[3, 0] += 1.0
    assert not case.check((tokens, noisy)).correct


def test_the_decode_workload_runs_on_a_node_without_the_models_extra() -> None:
    # A node provisioned without models has neither safetensors nor tokenizers (nor torch): the
    # suite's decode workload must still run there, or every such node would report an error.
    code = (
        "import sys, json\n"
        "sys.modules['safetensors'] = sys.modules['tokenizers'] = sys.modules['torch'] = None\n"
        "from vtpu import bench\n"
        "from vtpu.bench import workloads\n"
        "r = bench.run_workload('qwen3_decode', size='tiny', repeats=1)\n"
        "print(json.dumps({'error': r['error'], 'correct': r['correct']}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"error": None, "correct": True}
