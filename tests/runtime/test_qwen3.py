"""The Qwen3 decoder (vtpu.models.qwen3) and its paged KV cache (vtpu.models.kvcache), against
transformers' Qwen3ForCausalLM on small random models the tests write themselves.

Tolerance: in fp32, every step's logits agree with transformers' within 1e-4 of the step's
largest |logit| (measured: a few 1e-7), and greedy decoding agrees token for token. bf16 and int8
weights are held to a loose top-1 agreement bound with the measured rate printed.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vtpu import kernels as K  # noqa: E402
from vtpu.counters import COUNTERS  # noqa: E402
from vtpu.models import qwen3  # noqa: E402
from vtpu.models.kvcache import SEQUENCE_IDS, page_coordinates  # noqa: E402
from vtpu.models.qwen3 import (  # noqa: E402
    CacheFull,
    ModelLoadError,
    Qwen3Model,
    is_qwen3,
    read_config,
    weight_bytes,
)
from vtpu.ppt import PPTError  # noqa: E402

LOGIT_TOL = 1e-4  # of the step's largest |logit|
STEPS = 24
PROMPT = [3, 17, 101, 5, 250, 9, 77]
CACHE = 1 << 22

# name: (heads, kv_heads, hidden, head_dim, layers, intermediate, tied, theta dialect)
SHAPES = {
    "mha-tied": (4, 4, 64, 16, 2, 128, True, "rope_parameters"),
    "gqa2-untied-headdim32": (4, 2, 96, 32, 3, 160, False, "rope_parameters"),
    "gqa4-tied-headdim24-top-level-theta": (8, 2, 128, 24, 2, 256, True, "top-level"),
}


def write_model(
    directory: Path, heads, kv, hidden, head_dim, layers, inter, tied, dialect, seed=0, dtype=None
) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=500,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        tie_word_embeddings=tied,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        # Larger than transformers' 0.02, so a random model's greedy tokens vary.
        initializer_range=0.25,
    )
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory)
    if dialect == "top-level":  # the older dialect, as most published checkpoints have it
        path = directory / "config.json"
        raw = json.loads(path.read_text())
        del raw["rope_parameters"]
        raw.update(rope_theta=1000000.0, rope_scaling=None)
        path.write_text(json.dumps(raw))
    return directory


@pytest.fixture(scope="module", params=list(SHAPES))
def shape_dir(request, tmp_path_factory) -> tuple[str, Path]:
    d = tmp_path_factory.mktemp(request.param)
    return request.param, write_model(d, *SHAPES[request.param])


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("gqa"), *SHAPES["gqa2-untied-headdim32"])


def hf_greedy(directory: Path, prompt: list[int], steps: int, dtype=torch.float32):
    """transformers' greedy tokens and per-step logits (float32 numpy)."""
    model = transformers.Qwen3ForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    return tokens, [lg[0].float().numpy() for lg in out.logits]


def our_greedy(model: Qwen3Model, prompt: list[int], steps: int, forced=None):
    """Our greedy tokens and logits; with `forced`, feed those tokens (teacher forcing)."""
    seq = model.new_sequence()
    logits = [model.prefill(seq, prompt)]
    tokens = []
    for i in range(steps):
        tokens.append(int(logits[-1].argmax()))
        if i + 1 < steps:
            nxt = forced[i] if forced is not None else tokens[-1]
            logits.append(model.decode([seq], [nxt])[0])
    model.free(seq)
    return tokens, logits


def rel_err(ours, ref) -> float:
    return max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(ours, ref, strict=True))


# ---- agreement with transformers -----------------------------------------------------------


def test_greedy_decoding_matches_transformers_in_fp32(shape_dir):
    name, d = shape_dir
    ref_tokens, ref_logits = hf_greedy(d, PROMPT, STEPS)
    model = Qwen3Model(d, "fp32", cache_bytes=CACHE)
    tokens, logits = our_greedy(model, PROMPT, STEPS)
    err = rel_err(logits, ref_logits)
    print(f"{name}: {len(set(ref_tokens))} distinct tokens, max logit error {err:.2e} of scale")
    assert len(set(ref_tokens)) > 3, "the random model is degenerate: the test would be weak"
    assert tokens == ref_tokens
    assert err <= LOGIT_TOL


def test_both_rope_dialects_load_with_their_theta(shape_dir):
    name, d = shape_dir
    config = read_config(d)
    want = 1e6 if SHAPES[name][-1] == "top-level" else 1e4
    assert config.rope_theta == want
    assert config.head_dim == SHAPES[name][3] and config.kv_heads == SHAPES[name][1]
    assert is_qwen3(d)


def test_checkpoints_in_bf16_and_fp16_load_exactly(tmp_path):
    shape = SHAPES["gqa4-tied-headdim24-top-level-theta"][:-1] + ("rope_parameters",)
    for dtype in (torch.bfloat16, torch.float16):
        d = write_model(tmp_path / str(dtype), *shape, dtype=dtype)
        header = (d / "model.safetensors").read_bytes()[8:400].decode(errors="replace")
        assert {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype] in header
        # transformers upcasting the stored weights to float32 is the reference for "fp32".
        ref_tokens, ref_logits = hf_greedy(d, PROMPT, 12, dtype=torch.float32)
        tokens, logits = our_greedy(Qwen3Model(d, "fp32", cache_bytes=CACHE), PROMPT, 12)
        assert tokens == ref_tokens
        assert rel_err(logits, ref_logits) <= LOGIT_TOL


@pytest.mark.parametrize("precision, bound", [("bf16", 0.9), ("int8", 0.8)])
def test_reduced_precision_weights_agree_on_most_steps(gqa_dir, precision, bound):
    steps = 40
    ref_tokens, ref_logits = hf_greedy(gqa_dir, PROMPT, steps)
    model = Qwen3Model(gqa_dir, precision, cache_bytes=CACHE)
    # Teacher-forced on the reference's tokens, so one early flip does not decide the rest.
    tokens, logits = our_greedy(model, PROMPT, steps, forced=ref_tokens)
    rate = float(np.mean([a == b for a, b in zip(tokens, ref_tokens, strict=True)]))
    err = max(float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits, strict=True))
    scale = max(float(np.abs(b).max()) for b in ref_logits)
    print(f"{precision}: top-1 agreement {rate:.0%} over {steps} steps, max logit error {err:.3g}")
    assert rate >= bound
    assert err <= 0.1 * scale


def test_weight_bytes_are_what_the_load_keeps(gqa_dir, tmp_path):
    tied = write_model(tmp_path / "tied", *SHAPES["mha-tied"])
    for d in (gqa_dir, tied):
        for precision in qwen3.PRECISIONS:
            model = Qwen3Model(d, precision, cache_bytes=CACHE)
            assert weight_bytes(d, precision) == model.nbytes
    assert (
        weight_bytes(gqa_dir, "int8")
        < weight_bytes(gqa_dir, "bf16")
        < weight_bytes(gqa_dir, "fp32")
    )


@pytest.mark.parametrize("page_tokens", [4, 8, 16, 32])
def test_the_isa_paths_agree(gqa_dir, page_tokens):
    # page_tokens picks the attention kernel's paths: 16 keys at a time, 8, or the plain loop
    model = Qwen3Model(gqa_dir, "fp32", cache_bytes=CACHE, page_tokens=page_tokens)
    prompt = PROMPT * 3  # 21 tokens: full and part-filled pages
    fast = our_greedy(model, prompt, 14)
    try:
        K.set_isa("generic")
        portable = our_greedy(model, prompt, 14)
    finally:
        K.set_isa()
    assert fast[0] == portable[0]
    assert rel_err(portable[1], fast[1]) <= 1e-5


# ---- prefill, decode and the cache -----------------------------------------------------------


def test_batched_decode_equals_separate_decodes(gqa_dir):
    model = Qwen3Model(gqa_dir, "fp32", cache_bytes=CACHE, page_tokens=8)
    prompts = [PROMPT, PROMPT[:2], [9] * 13]  # lengths 7, 2, 13: pages part-filled differently
    alone = []
    for p in prompts:
        alone.append(our_greedy(model, p, 6))
    seqs = [model.new_sequence() for _ in prompts]
    last = [model.prefill(s, p) for s, p in zip(seqs, prompts, strict=True)]
    batched = [[lg] for lg in last]
    for _ in range(5):
        nxt = [int(lg.argmax()) for lg in last]
        last = list(model.decode(seqs, nxt))
        for b, lg in enumerate(last):
            batched[b].append(lg)
    for b in range(3):
        assert [int(lg.argmax()) for lg in batched[b]] == alone[b][0]
        assert rel_err(batched[b], alone[b][1]) <= 1e-5
    assert [s.length for s in seqs] == [len(p) + 5 for p in prompts]


def test_prefill_in_chunks_and_continued_equals_one_pass(gqa_dir, monkeypatch):
    model = Qwen3Model(gqa_dir, "fp32", cache_bytes=CACHE, page_tokens=4)
    ids = list(range(30, 70))
    one = model.new_sequence()
    whole = model.prefill(one, ids)
    two = model.new_sequence()
    model.prefill(two, ids[:11])
    continued = model.prefill(two, ids[11:])
    monkeypatch.setattr(qwen3, "PREFILL_CHUNK", 7)
    three = model.new_sequence()
    chunked = model.prefill(three, ids)
    assert one.length == two.length == three.length == len(ids)
    assert rel_err([continued, chunked], [whole, whole]) <= 1e-5
    step = [model.decode([s], [5])[0] for s in (one, two, three)]
    assert rel_err(step[1:], step[:1] * 2) <= 1e-5


def test_cache_pages_grow_free_and_run_out(gqa_dir):
    config = read_config(gqa_dir)
    per_page = 4 * config.layers * 2 * config.kv_heads * 4 * config.head_dim
    model = Qwen3Model(gqa_dir, "fp32", cache_bytes=6 * per_page + 100, page_tokens=4)
    stats = model.cache_stats()
    assert stats["pages_total"] == 6 and stats["bytes_per_page"] == per_page
    assert model.cache_bytes == 6 * per_page
    a = model.new_sequence()
    model.prefill(a, PROMPT)  # 7 tokens: 2 pages
    assert model.cache_stats()["pages_used"] == 2 == len(a.pages) == model.pages_needed(7)
    model.decode([a], [1])  # 8 tokens: still 2 pages
    assert model.cache_stats()["pages_used"] == 2
    model.decode([a], [1])  # 9: a third page
    assert model.cache_stats()["pages_used"] == 3
    b = model.new_sequence()
    with pytest.raises(CacheFull, match=r"needs 4 more page.*3 of 6 are free"):
        model.prefill(b, list(range(13)))
    assert b.length == 0 and model.cache_stats()["pages_used"] == 3  # nothing taken
    model.prefill(b, list(range(12)))  # exactly the 3 left
    with pytest.raises(CacheFull):
        model.decode([a, b], [1, 1])  # b needs a page; a has room, but a step is all or none
    assert (a.length, b.length) == (9, 12)
    assert model.cache_stats()["sequences"] == 2
    model.free(b)
    model.free(b)  # idempotent
    assert model.cache_stats()["pages_used"] == 3 and b.length == 0 and b.pages == ()
    assert model.cache_stats()["sequences"] == 1
    model.decode([a], [1])
    with pytest.raises(ValueError, match="freed"):
        model.decode([b], [1])
    model.free(a)
    assert model.cache_stats()["pages_used"] == 0


def test_decode_translates_cache_pages_through_the_ppt(gqa_dir):
    model = Qwen3Model(gqa_dir, "fp32", cache_bytes=CACHE, page_tokens=4)
    seqs = [model.new_sequence() for _ in range(2)]
    for s in seqs:
        model.prefill(s, PROMPT)
    before = COUNTERS.snapshot()["ppt_lookups"]
    table = model.cache.ppt.stats()["lookups"]
    for _ in range(3):
        model.decode(seqs, [1, 2])
    # each step translates both sequences' pages: 2 + 2 pages (8 tokens) for both steps before
    # the 9th token, then 3 + 3
    assert model.cache.ppt.stats()["lookups"] - table == 4 + 6 + 6
    assert COUNTERS.snapshot()["ppt_lookups"] - before >= 16


def test_page_coordinates_carry_the_sequence_id_and_the_page_index():
    text = lambda row: "{}.{}.{}/{}.{}.{}/{}.{}.{}".format(*row.tolist())  # noqa: E731
    assert text(page_coordinates(1, 0)[0]) == "1.1.1/1.1.1/1.1.1"
    assert text(page_coordinates(2, 1000)[0]) == "1.1.1/1.1.2/1.2.2"
    assert text(page_coordinates(1000, 998)[0]) == "1.1.1/1.2.1/1.1.999"
    assert (
        text(page_coordinates(SEQUENCE_IDS, 999**3 - 1)[0]) == "999.999.999/999.999.999/999.999.999"
    )
    assert text(page_coordinates(SEQUENCE_IDS + 2, 0)[0]) == "1.1.1/1.1.2/1.1.1"  # ids wrap
    block = page_coordinates(7, 997, 4)
    assert block.dtype == np.uint16 and block[:, 6:].tolist() == [
        [1, 1, 998], [1, 1, 999], [1, 2, 1], [1, 2, 2]
    ]  # fmt: skip
    with pytest.raises(ValueError, match="outside a sequence's"):
        page_coordinates(1, 999**3 - 1, 2)
    with pytest.raises(ValueError, match="positive integer"):
        page_coordinates(0, 0)


def test_sequence_pages_are_mapped_in_the_ppt_only_while_the_sequence_lives(gqa_dir):
    model = Qwen3Model(gqa_dir, "fp32", cache_bytes=CACHE, page_tokens=4)
    ppt, per_page = model.cache.ppt, model.cache_stats()["bytes_per_page"]
    assert ppt.stats()["pages_mapped"] == 0 and not ppt.map_on_touch
    a, b = model.new_sequence(), model.new_sequence()
    model.prefill(a, PROMPT)  # 2 pages
    model.prefill(b, PROMPT * 2)  # 4 pages
    model.decode([a, b], [1, 2])
    model.decode([a, b], [1, 2])  # a: 9 tokens, a third page
    for s, n in ((a, 3), (b, 4)):
        assert np.array_equal(s.coordinates, page_coordinates(s.id, 0, n))
        assert (ppt.translate_many(s.coordinates) // per_page).tolist() == list(s.pages)
    assert ppt.stats()["pages_mapped"] == model.cache_stats()["pages_used"] == 7
    assert ppt.stats()["regions"] == 2  # one per sequence
    gone = a.coordinates.copy()
    model.free(a)
    assert ppt.stats()["pages_mapped"] == model.cache_stats()["pages_used"] == 4
    assert a.coordinates.shape == (0, 9)
    with pytest.raises(PPTError, match=r"row 0 \(1\.1\.1/1\.1\.1/1\.1\.1\) is not mapped"):
        ppt.translate_many(gone)
    for row in gone:
        with pytest.raises(PPTError, match="not mapped"):
            ppt.translate(row)
    model.free(b)
    assert ppt.stats()["pages_mapped"] == ppt.stats()["regions"] == 0


def test_frames_reused_by_another_sequence_give_a_fresh_runs_results(gqa_dir):
    config = read_config(gqa_dir)
    per_page = 4 * config.layers * 2 * config.kv_heads * 4 * config.head_dim
    # 8 pages of 4 tokens: two 12-token sequences fill it, so later ones reuse freed frames.
    model = Qwen3Model(gqa_dir, "fp32", cache_bytes=8 * per_page, page_tokens=4)
    prompts = {"c": [9, 8, 7, 6, 5], "d": [40, 41, 42], "e": list(range(100, 106))}
    fresh = {k: our_greedy(model, p, 8) for k, p in prompts.items()}  # alone, on clean frames
    a, c = model.new_sequence(), model.new_sequence()
    model.prefill(a, [3] * 10)
    logits = {"c": [model.prefill(c, prompts["c"])]}
    logits["c"].append(model.decode([a, c], [4, int(logits["c"][-1].argmax())])[1])
    a_frames = set(a.pages)
    model.free(a)  # c keeps decoding while d and then e take a's frames
    d = model.new_sequence()
    logits["d"] = [model.prefill(d, prompts["d"])]
    assert set(d.pages) <= a_frames
    live = {"c": c, "d": d}
    for step in range(6):
        names = list(live)
        nxt = [int(logits[k][-1].argmax()) for k in names]
        for k, row in zip(names, model.decode([live[k] for k in names], nxt), strict=True):
            logits[k].append(row)
        if step == 2:  # d leaves; e takes its pages, which were a's, and joins c's batch
            model.free(live.pop("d"))
            live["e"] = e = model.new_sequence()
            logits["e"] = [model.prefill(e, prompts["e"])]
            assert set(e.pages) <= a_frames
    for k, rows in logits.items():
        tokens, ref = fresh[k]
        assert [int(r.argmax()) for r in rows] == tokens[: len(rows)]
        assert rel_err(rows, ref[: len(rows)]) <= 1e-5


def test_free_from_another_thread_while_the_worker_decodes(gqa_dir):
    model = Qwen3Model(gqa_dir, "fp32", cache_bytes=CACHE, page_tokens=4)

    def worker(a, b, b_logits, started, go_at, refused, errors):
        """Decode a and b until a step refuses the freed a, then b alone for 4 more steps."""
        live = [a, b]
        try:
            # b's context bounds the steps; the free lands within a few of them.
            while len(b_logits) < 240 and (not refused or len(b_logits) < refused[0] + 5):
                if len(b_logits) == go_at:
                    started.set()
                nxt_b = int(b_logits[-1].argmax())
                try:
                    out = model.decode(live, [1, nxt_b][-len(live) :])
                except ValueError as exc:
                    assert "freed" in str(exc)
                    refused.append(len(b_logits))
                    live = [b]
                    out = model.decode(live, [nxt_b])
                b_logits.append(out[-1])
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)
        started.set()

    for attempt in range(3):  # the free lands at a different point of a step each time
        a, b = model.new_sequence(), model.new_sequence()
        model.prefill(a, [5] * 9)
        b_logits = [model.prefill(b, PROMPT)]
        started, refused, errors = threading.Event(), [], []
        thread = threading.Thread(
            target=worker, args=(a, b, b_logits, started, 2 + attempt, refused, errors)
        )
        thread.start()
        started.wait(timeout=60)
        model.free(a)
        thread.join(timeout=120)
        assert not thread.is_alive() and errors == []
        assert len(refused) == 1  # the first step after the free refused a, then b went on
        assert model.cache.ppt.stats()["pages_mapped"] == len(b.pages)
        ref_tokens, ref_logits = our_greedy(model, PROMPT, len(b_logits))
        assert [int(r.argmax()) for r in b_logits] == ref_tokens
        assert rel_err(b_logits, ref_logits) <= 1e-5
        model.free(b)
        assert model.cache_stats()["pages_used"] == model.cache.ppt.stats()["pages_mapped"] == 0


def test_bad_inputs_are_refused(gqa_dir):
    model = Qwen3Model(gqa_dir, "fp32", cache_bytes=CACHE)
    seq = model.new_sequence()
    with pytest.raises(ValueError, match="no token"):
        model.prefill(seq, [])
    with pytest.raises(ValueError, match="500 is outside the vocabulary"):
        model.prefill(seq, [1, 500])
    with pytest.raises(ValueError, match="context of 256"):
        model.prefill(seq, [1] * 257)
    assert seq.length == 0 and model.cache_stats()["pages_used"] == 0
    model.prefill(seq, [1] * 256)
    with pytest.raises(ValueError, match="context is 256"):
        model.decode([seq], [1])
    with pytest.raises(ValueError, match="2 token ids"):
        model.decode([seq], [1, 2])
    with pytest.raises(ValueError, match="twice"):
        model.decode([seq, seq], [1, 2])


# ---- loading: refusals and side files ------------------------------------------------------


def edited(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None and key.startswith("drop_"):
            raw.pop(key[5:], None)
        else:
            raw[key] = value
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
         "rope_parameters"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial": 0.5}},
         "rope_parameters.partial"),
        ({"drop_rope_parameters": None, "rope_theta": 1e4,
          "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_theta": 5e5}, "disagree"),
        ({"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "llama"}, "model_type"),
        ({"architectures": ["Qwen3ForSequenceClassification"]}, "architectures"),
        ({"layer_types": ["sliding_attention", "full_attention", "full_attention"]},
         "layer_types"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"some_future_field": 1}, "some_future_field"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"head_dim": 15}, "head_dim"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"hidden_size": 80}, "model.embed_tokens.weight has shape"),
        ({"num_hidden_layers": 4, "drop_layer_types": None}, "weights missing: model.layers.3."),
    ],
)  # fmt: skip
def test_unsupported_configs_are_refused_by_name(gqa_dir, tmp_path, changes, named):
    d = edited(gqa_dir, tmp_path / "m", **changes)
    with pytest.raises(ModelLoadError, match=named.replace(".", r"\.").replace("[", r"\[")):
        Qwen3Model(d, "fp32", cache_bytes=CACHE)


def test_irrelevant_and_off_fields_load(gqa_dir, tmp_path):
    d = edited(
        gqa_dir, tmp_path / "m", torch_dtype="bfloat16", use_sliding_window=False,
        sliding_window=4096, max_window_layers=28, attention_dropout=0.1, use_cache=False,
        initializer_range=0.5, rope_scaling=None,
    )  # fmt: skip
    assert read_config(d).layers == 3


def test_load_refusals_name_the_problem(gqa_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="precision 'fp8'"):
        Qwen3Model(gqa_dir, "fp8", cache_bytes=CACHE)
    with pytest.raises(ModelLoadError, match="holds no page"):
        Qwen3Model(gqa_dir, "fp32", cache_bytes=100)
    with pytest.raises(ModelLoadError, match="page_tokens"):
        Qwen3Model(gqa_dir, "fp32", cache_bytes=CACHE, page_tokens=0)
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        read_config(tmp_path)
    assert not is_qwen3(tmp_path)
    extra = tmp_path / "extra"
    shutil.copytree(gqa_dir, extra)
    from safetensors.numpy import save_file

    save_file({"model.layers.0.self_attn.q_proj.bias": np.zeros(128, np.float32)},
              str(extra / "bias.safetensors"))  # fmt: skip
    with pytest.raises(ModelLoadError, match="does not implement: model.layers.0.self_attn.q_"):
        Qwen3Model(extra, "fp32", cache_bytes=CACHE)


def test_untied_flag_missing_is_read_from_the_weights(gqa_dir, tmp_path):
    d = edited(gqa_dir, tmp_path / "m", drop_tie_word_embeddings=None)
    assert read_config(d).tie_embeddings is False  # lm_head.weight is there


def test_side_files_give_eos_ids_chat_template_and_tokenizer(gqa_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path / "m"
    shutil.copytree(gqa_dir, d)
    vocab = {f"w{i}": i for i in range(499)}
    vocab["<|im_end|>"] = 499
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (d / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "<|im_end|>"})
    )
    model = Qwen3Model(d, "fp32", cache_bytes=CACHE)
    assert model.chat_template == template
    assert model.tokenizer.encode("w5 w9").ids == [5, 9]
    assert model.eos_token_ids == (499,)  # from the tokenizer's eos token: no other source
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [11, 12]}))
    assert Qwen3Model(d, "fp32", cache_bytes=CACHE).eos_token_ids == (11, 12)
    assert Qwen3Model(gqa_dir, "fp32", cache_bytes=CACHE).tokenizer is None
