"""`POST /v1/completions` and `/v1/chat/completions` on a real agent serving a tiny random Qwen3
that this module writes with `transformers` (seeded), with a byte-level BPE tokenizer built with
`tokenizers` and a ChatML template: greedy output token for token against `transformers`'
`generate` (raw HTTP and the official `openai` client, whole and streamed), text and chat prompts,
stop strings, seeds, logprobs against log_softmax, four concurrent streams, cancellation freeing
KV pages, and the refusals (context, sequences, cache, auth, model kinds) with the agent still
serving."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.test_agent import RunningAgent, call_json, start_agent, stop_agent
from tests.runtime.test_models import MINILM_DIR

torch = pytest.importorskip("torch", reason="the reference is transformers on PyTorch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai", reason="the openai client is a dev dependency")
httpx = pytest.importorskip("httpx2", reason="the openai client's HTTP library")

MODEL = "tiny"
BARE = "bare"  # the same weights without tokenizer files
CONTEXT = 4096
PAGE_BYTES = 16 * 1024  # 16 tokens x 2 layers x (K + V) x 2 kv heads x 32 floats x 4 bytes
CACHE_PAGES = 900
MAX_SEQUENCES = 4
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? fine, thanks",
    "a node serves models to customers; tokens stream back as server-sent events",
    "continuous batching shares every decode step between the sequences",
] * 10
PROMPTS = [[5, 6, 7, 8], [10, 20, 30], list(range(1, 40)), [3, 9]]


def _write_model(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=special, show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    config = transformers.Qwen3Config(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # not hidden / heads
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.token_to_id("<|endoftext|>"),
        bos_token_id=None,
        pad_token_id=None,
        initializer_range=0.1,  # logits far enough apart that greedy has no near-ties
    )
    torch.manual_seed(11)
    transformers.Qwen3ForCausalLM(config).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": TEMPLATE,
                "eos_token": "<|endoftext|>",
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qwen3")
    _write_model(root / MODEL)
    (root / BARE).mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(root / MODEL / name, root / BARE / name)
    return root / MODEL, root / BARE


@pytest.fixture(scope="module")
def agent(model_dirs: tuple[Path, Path], tmp_path_factory) -> Iterator[RunningAgent]:
    tiny, bare = model_dirs
    extra = ["--load-model", "all-MiniLM-L6-v2"] if MINILM_DIR else []
    running = start_agent(
        tmp_path_factory.mktemp("completions") / "state",
        *("--model-dir", f"{MODEL}={tiny}", "--model-dir", f"{BARE}={bare}"),
        *("--load-model", MODEL, "--load-model", BARE, *extra),
        *("--kv-cache-bytes", str(CACHE_PAGES * PAGE_BYTES)),
        *("--max-sequences", str(MAX_SEQUENCES)),
    )
    yield running
    stop_agent(running)


@pytest.fixture(scope="module")
def client(agent: RunningAgent):
    return openai.OpenAI(base_url=f"{agent.url}/v1", api_key=agent.token, max_retries=0)


@pytest.fixture(scope="module")
def reference(model_dirs: tuple[Path, Path]):
    model = transformers.Qwen3ForCausalLM.from_pretrained(model_dirs[0]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dirs[0])
    return model, tokenizer


def greedy(reference, prompt: list[int], n: int) -> list[int]:
    model, _ = reference
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def log_softmax(reference, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) log-probabilities of the next token after each position."""
    model, _ = reference
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def engine(agent: RunningAgent, name: str = MODEL) -> dict:
    status, doc = call_json(agent, "GET", "/vTPU/telemetry")
    assert status == 200
    return doc["models"]["loaded"][name]["llm"]


def post(agent: RunningAgent, path: str, body: dict, token: str | None = None, timeout=60):
    headers = {"Authorization": f"Bearer {token or agent.token}"}
    return httpx.post(f"{agent.url}{path}", json=body, headers=headers, timeout=timeout)


def sse(agent: RunningAgent, path: str, body: dict) -> list:
    """The data of every server-sent event of a streamed answer (the last is '[DONE]')."""
    events = []
    headers = {"Authorization": f"Bearer {agent.token}"}
    with httpx.stream("POST", f"{agent.url}{path}", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---------------------------------------------------------------------------------------------


def test_token_id_prompts_match_transformers_greedy(agent: RunningAgent, reference) -> None:
    for prompt in PROMPTS:
        r = post(
            agent,
            "/v1/completions",
            {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        doc = r.json()
        (choice,) = doc["choices"]
        expected = greedy(reference, prompt, 24)
        assert choice["token_ids"] == expected
        assert doc["object"] == "text_completion" and doc["model"] == MODEL
        assert doc["id"].startswith("cmpl-")
        assert choice["finish_reason"] == ("length" if len(expected) == 24 else "stop")
        assert doc["usage"] == {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(expected),
            "total_tokens": len(prompt) + len(expected),
        }
        assert choice["text"] == reference[1].decode(expected, skip_special_tokens=True)
    # a batch of one prompt is the prompt
    r = post(
        agent,
        "/v1/completions",
        {"model": MODEL, "prompt": [PROMPTS[1]], "max_tokens": 5, "temperature": 0},
    )
    assert r.json()["choices"][0]["token_ids"] == greedy(reference, PROMPTS[1], 5)


def test_metrics_count_the_llm_work_and_its_cache_pages(agent: RunningAgent) -> None:
    from tests.runtime.test_agent import metric_value

    def generated() -> float:
        return metric_value(agent, "vtpu_model_tokens_total", model=MODEL, kind="generated")

    before = generated()
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
    r = post(agent, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert generated() - before == r.json()["usage"]["completion_tokens"]
    assert metric_value(agent, "vtpu_kv_cache_pages", model=MODEL, state="total") == CACHE_PAGES
    assert metric_value(agent, "vtpu_kv_cache_pages", model=MODEL, state="used") == 0
    assert metric_value(agent, "vtpu_model_resident_bytes", model=MODEL) > CACHE_PAGES * PAGE_BYTES


def test_the_openai_client_whole_and_streamed(client, reference) -> None:
    prompt = PROMPTS[0]
    expected = greedy(reference, prompt, 20)
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    assert answer.choices[0].model_extra["token_ids"] == expected
    assert answer.usage.completion_tokens == len(expected)
    ids, text, usage, finish = [], "", None, None
    stream = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            ids += choice.model_extra["token_ids"]
            text += choice.text
            finish = choice.finish_reason or finish
    assert ids == expected and text == answer.choices[0].text
    assert finish == answer.choices[0].finish_reason
    assert usage.prompt_tokens == len(prompt) and usage.completion_tokens == len(expected)


def test_text_prompts_and_chat_use_the_tokenizer_and_its_template(client, reference) -> None:
    _, tokenizer = reference
    text = "hello world, the quick brown fox"
    ids = tokenizer(text)["input_ids"]
    answer = client.completions.create(model=MODEL, prompt=text, max_tokens=16, temperature=0)
    expected = greedy(reference, ids, 16)
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.choices[0].model_extra["token_ids"] == expected
    assert answer.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)

    messages = [
        {"role": "system", "content": "you serve tokens"},
        {"role": "user", "content": "how are you today?"},
    ]
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(chat_ids, dict) or hasattr(chat_ids, "input_ids"):
        chat_ids = chat_ids["input_ids"]
    expected = greedy(reference, list(chat_ids), 12)
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=12, temperature=0
    )
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.usage.prompt_tokens == len(chat_ids)
    assert chat.choices[0].model_extra["token_ids"] == expected
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    # streamed chat: a role first, then the same content
    pieces, roles = [], []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True
    ):
        delta = chunk.choices[0].delta
        roles.append(delta.role)
        pieces.append(delta.content or "")
    assert roles[0] == "assistant" and "".join(pieces) == chat.choices[0].message.content


def test_stop_strings_trim_the_text_as_openai_does(agent: RunningAgent, client) -> None:
    prompt = "the lazy dog"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
    text = full.choices[0].text
    assert len(text) > 12, text
    stop = text[8:11]
    cut = text[: text.index(stop)]
    answer = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=["never there", stop]
    )
    assert answer.choices[0].text == cut
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens < full.usage.completion_tokens
    # streamed: the stop string is never sent, not even in part
    events = sse(
        agent,
        "/v1/completions",
        {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0, "stop": stop}
        | {"stream": True},
    )
    assert events[-1] == "[DONE]"
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert streamed == cut
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_and_seeded_sampling(client) -> None:
    answer = client.completions.create(model=MODEL, prompt=[4, 5], max_tokens=7, temperature=0)
    ids = answer.choices[0].model_extra["token_ids"]
    assert len(ids) == 7 or answer.choices[0].finish_reason == "stop"

    def sampled(seed: int, **kw) -> list[int]:
        out = client.completions.create(
            model=MODEL, prompt=[4, 5], max_tokens=30, temperature=1.0, seed=seed, **kw
        )
        return out.choices[0].model_extra["token_ids"]

    a, b, c = sampled(1), sampled(1), sampled(2)
    assert a == b and a != c
    assert sampled(3, top_p=0.5) == sampled(3, top_p=0.5)


def test_logprobs_are_transformers_log_softmax(client, reference) -> None:
    prompt = PROMPTS[2]
    answer = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=5
    )
    choice = answer.choices[0]
    ids = choice.model_extra["token_ids"]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    ref = log_softmax(reference, prompt + ids)[len(prompt) - 1 : len(prompt) - 1 + len(ids)]
    np.testing.assert_allclose(lp.token_logprobs, ref[np.arange(len(ids)), ids], atol=1e-4)
    _, tokenizer = reference
    for i, top in enumerate(lp.top_logprobs):
        best = np.sort(ref[i])[::-1][: len(top)]
        np.testing.assert_allclose(sorted(top.values(), reverse=True), best, atol=1e-4)
        # greedy: the chosen token is the best one
        assert max(top.values()) == pytest.approx(lp.token_logprobs[i], abs=1e-6)
        assert lp.tokens[i] == tokenizer.decode([ids[i]])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # chat: logprobs true with top_logprobs
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-6)
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token


def test_four_concurrent_streams_each_equal_their_single_stream(agent: RunningAgent, reference):
    expected = [greedy(reference, p, 40) for p in PROMPTS]
    before = engine(agent)
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(PROMPTS))

    def one(i: int) -> None:
        c = openai.OpenAI(base_url=f"{agent.url}/v1", api_key=agent.token, max_retries=0)
        barrier.wait()
        ids: list[int] = []
        for chunk in c.completions.create(
            model=MODEL, prompt=PROMPTS[i], max_tokens=40, temperature=0, stream=True
        ):
            ids += chunk.choices[0].model_extra["token_ids"]
        results[i] = ids

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results.get(i) for i in range(len(PROMPTS))] == expected
    after = engine(agent)
    assert after["finished"] - before["finished"] == len(PROMPTS)
    assert after["largest_batch"] >= 2  # decode steps were shared
    assert after["generated_tokens"] - before["generated_tokens"] == sum(map(len, expected))
    assert after["pages_used"] == 0 and after["active_sequences"] == 0
    # the KV pages were found through the Phext Page Table: its lookups are in the telemetry
    hit_rate = call_json(agent, "GET", "/vTPU/telemetry")[1]["ppt_hit_rate"]
    assert hit_rate is not None and 0 <= hit_rate <= 1


def _open_streams(agent: RunningAgent, count: int, max_tokens: int):
    """`count` long streams, each read up to its first token; the caller closes them."""
    headers = {"Authorization": f"Bearer {agent.token}"}
    streams = []
    for i in range(count):
        body = {"model": MODEL, "prompt": [i + 1, 7], "max_tokens": max_tokens, "temperature": 0}
        body["stream"] = True
        cm = httpx.stream(
            "POST", f"{agent.url}/v1/completions", json=body, headers=headers, timeout=60
        )
        response = cm.__enter__()
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: dropping it would close the response
        while not next(lines).startswith("data: "):
            pass
        streams.append((cm, lines))
    return streams


def _close(streams) -> None:
    for cm, _ in streams:
        cm.__exit__(None, None, None)


def _wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_cancelled_streams_free_their_pages_at_once(agent: RunningAgent, client) -> None:
    before = engine(agent)
    streams = _open_streams(agent, 2, CONTEXT - 2)
    during = engine(agent)
    assert during["active_sequences"] == 2 and during["pages_used"] >= 2
    assert during["pages_reserved"] == 2 * (CONTEXT // 16)
    _close(streams)
    assert _wait_for(lambda: engine(agent)["pages_used"] == 0, 2.0), engine(agent)
    after = engine(agent)
    # they were stopped, not finished: 4094 tokens each would have taken far longer
    assert after["cancelled"] - before["cancelled"] == 2
    assert after["finished"] == before["finished"]
    assert after["pages_reserved"] == 0 and after["active_sequences"] == 0
    # a whole (non-streamed) answer whose client hangs up is stopped too
    body = {"model": MODEL, "prompt": [2, 7], "max_tokens": CONTEXT - 2, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        post(agent, "/v1/completions", body, timeout=0.3)
    assert _wait_for(lambda: engine(agent)["cancelled"] == after["cancelled"] + 1, 2.0)
    assert engine(agent)["pages_used"] == 0 and engine(agent)["finished"] == before["finished"]
    assert client.completions.create(model=MODEL, prompt=[1], max_tokens=3).usage


def test_over_limit_requests_get_reasons_and_the_agent_keeps_serving(
    agent: RunningAgent, client
) -> None:
    # context: never servable
    r = post(agent, "/v1/completions", {"model": MODEL, "prompt": [1] * 100, "max_tokens": CONTEXT})
    assert r.status_code == 400
    error = r.json()["error"]
    assert "maximum context length is 4096 tokens" in error["message"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt=[1] * 100, max_tokens=CONTEXT)
    # concurrent sequences: all taken -> 429 with Retry-After
    streams = _open_streams(agent, MAX_SEQUENCES, 3000)
    try:
        r = post(agent, "/v1/completions", {"model": MODEL, "prompt": [1], "max_tokens": 4})
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert "maximum of 4 concurrent sequences" in r.json()["error"]["message"]
        with pytest.raises(openai.RateLimitError, match="concurrent sequences"):
            client.completions.create(model=MODEL, prompt=[1], max_tokens=4)
    finally:
        _close(streams)
    assert _wait_for(lambda: engine(agent)["active_sequences"] == 0)
    # cache: three full-context streams reserve 768 of the 900 pages; a fourth does not fit now
    streams = _open_streams(agent, 3, CONTEXT - 2)
    try:
        r = post(
            agent, "/v1/completions", {"model": MODEL, "prompt": [1, 2], "max_tokens": CONTEXT - 2}
        )
        assert r.status_code == 429, r.text
        message = r.json()["error"]["message"]
        assert "KV cache of tiny is full" in message and "132 of 900 are free" in message
        # a short request still fits beside them
        r = post(agent, "/v1/completions", {"model": MODEL, "prompt": [1], "max_tokens": 4})
        assert r.status_code == 200
    finally:
        _close(streams)
    assert _wait_for(lambda: engine(agent)["pages_reserved"] == 0)
    assert engine(agent)["refused"] >= 3
    assert client.completions.create(model=MODEL, prompt=[1], max_tokens=3).choices


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": [1], "n": 2}, "'n' must be 1"),
        ("/v1/completions", {"model": MODEL, "prompt": [1], "echo": True}, "'echo'"),
        ("/v1/completions", {"model": MODEL, "prompt": [1], "suffix": "x"}, "unsupported fields"),
        ("/v1/completions", {"model": MODEL, "prompt": [1], "logprobs": 21}, "from 0 to 20"),
        ("/v1/completions", {"model": MODEL, "prompt": [1], "stop": list("abcde")}, "at most 4"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, "one per request"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 100000]}, "outside tiny's vocabulary"),
        ("/v1/completions", {"model": MODEL, "prompt": []}, "'prompt' is empty"),
        ("/v1/completions", {"model": MODEL}, "'prompt' is required"),
        ("/v1/completions", {"model": MODEL, "prompt": [1], "temperature": 3}, "from 0 to 2"),
        ("/v1/completions", {"model": MODEL, "prompt": [1], "max_tokens": 0}, "positive integer"),
        ("/v1/completions", {"model": MODEL, "prompt": [1], "stream_options": {}}, "only allowed"),
        ("/v1/chat/completions", {"model": MODEL}, "'messages' is required"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "x"}]}, "'role'"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "needs 'logprobs'",
        ),
        ("/v1/completions", {"model": BARE, "prompt": "text"}, "has no tokenizer"),
        ("/v1/completions", {"model": BARE, "prompt": [1], "stop": "x"}, "has no tokenizer"),
        (
            "/v1/chat/completions",
            {"model": BARE, "messages": [{"role": "user", "content": "x"}]},
            "has no tokenizer",
        ),
    ],
)
def test_bad_requests_get_openai_shaped_reasons(agent: RunningAgent, path, body, needle) -> None:
    r = post(agent, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_auth_model_names_and_kinds(agent: RunningAgent, client) -> None:
    r = post(agent, "/v1/completions", {"model": MODEL, "prompt": [1]}, token="wrong")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    nobody = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        nobody.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="gpt-17"):
        client.completions.create(model="gpt-17", prompt=[1])
    with pytest.raises(openai.BadRequestError, match="not an embedding model"):
        client.embeddings.create(model=MODEL, input="x")
    if MINILM_DIR is not None:
        with pytest.raises(openai.BadRequestError, match="is an embedding model"):
            client.completions.create(model="all-MiniLM-L6-v2", prompt=[1])
        with pytest.raises(openai.BadRequestError, match="is an embedding model"):
            client.chat.completions.create(
                model="all-MiniLM-L6-v2", messages=[{"role": "user", "content": "x"}]
            )
    # a model without a tokenizer still answers token ids, with ids as its logprob tokens
    answer = client.completions.create(
        model=BARE, prompt=[5, 6], max_tokens=4, logprobs=1, temperature=0
    )
    choice = answer.choices[0]
    assert choice.text == "" and len(choice.model_extra["token_ids"]) == 4
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in choice.model_extra["token_ids"]]
    ids = {m.id for m in client.models.list()}
    assert {MODEL, BARE} <= ids


def test_models_list_unload_mid_stream_and_load_again(agent: RunningAgent, client) -> None:
    status, doc = call_json(agent, "GET", "/vTPU/models")
    assert status == 200
    tiny = next(m for m in doc["models"] if m["id"] == MODEL)
    assert tiny["kind"] == "llm" and tiny["precision"] == "fp32" and tiny["state"] == "loaded"
    assert tiny["cache_bytes"] == CACHE_PAGES * PAGE_BYTES
    assert tiny["engine"]["pages_total"] == CACHE_PAGES and tiny["context_length"] == CONTEXT
    assert tiny["bytes"] == tiny["weight_bytes"] + tiny["cache_bytes"] + tiny["workspace_bytes"]
    streams = _open_streams(agent, 1, CONTEXT - 2)
    try:
        assert call_json(agent, "POST", "/vTPU/models/unload", {"model": MODEL})[0] == 200
        # the open stream ends with an error event, not a hang
        events = [line for line in streams[0][1] if line.startswith("data: ")]
        errors = [json.loads(e[6:]) for e in events if e.startswith('data: {"error"')]
        assert errors and "unloaded" in errors[0]["error"]["message"]
        assert events[-1] == "data: [DONE]"
    finally:
        _close(streams)
    with pytest.raises(openai.NotFoundError, match="not loaded on this node"):
        client.completions.create(model=MODEL, prompt=[1])
    status, doc = call_json(agent, "POST", "/vTPU/models", {"model": MODEL})
    assert status == 200 and doc["kind"] == "llm"
    assert client.completions.create(model=MODEL, prompt=[1], max_tokens=2).usage.completion_tokens


def test_an_engine_refuses_what_its_cache_can_never_hold(model_dirs) -> None:
    from vtpu.models import ModelError
    from vtpu.models.generate import Engine, SamplingParams
    from vtpu.models.qwen3 import Qwen3Model

    model = Qwen3Model(model_dirs[0], cache_bytes=8 * PAGE_BYTES)  # 128 tokens in all
    engine = Engine(model, name="small", max_sequences=2)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ModelError, match="has 8 in all") as refused:
            engine.submit([1] * 100, SamplingParams(max_tokens=100), loop)
        assert refused.value.status == 400
        handle = engine.submit([1, 2], SamplingParams(max_tokens=5, temperature=0), loop)

        async def collect() -> list[int]:
            ids: list[int] = []
            while True:
                update = await handle.events.get()
                ids += [t.id for t in update.tokens]
                if update.finish_reason:
                    return ids

        assert len(loop.run_until_complete(asyncio.wait_for(collect(), 30))) <= 5
    finally:
        engine.stop()
        loop.close()
    assert model.cache_stats()["pages_used"] == 0


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.5, 1.0), (1.0, 0.7)])
def test_sampling_draws_from_the_tempered_nucleus(temperature: float, top_p: float) -> None:
    from vtpu.models.generate import SamplingParams, sample

    logits = np.array([2.0, 1.0, 0.5, -1.0, 0.0], np.float32)
    params = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p)
    rng = np.random.default_rng(0)
    draws = np.bincount([sample(logits, params, rng) for _ in range(20000)], minlength=5)
    p = np.exp(logits / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    nucleus = order[: np.searchsorted(np.cumsum(p[order]), top_p) + 1]
    expected = np.zeros_like(p)
    expected[nucleus] = p[nucleus] / p[nucleus].sum()
    np.testing.assert_allclose(draws / 20000, expected, atol=0.015)
    assert draws[expected == 0].sum() == 0  # nothing outside the nucleus


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model-dir", "nodir"], "wants NAME=DIR"),
        (["--model-dir", "x=/nonexistent"], "has no config.json"),
        (["--kv-cache-bytes", "lots"], "byte count or a fraction"),
        (["--max-sequences", "0"], "--max-sequences must be a positive integer"),
    ],
)
def test_bad_llm_options_are_refused(tmp_path: Path, args: list[str], needle: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "vtpu", "agent", "--state-dir", str(tmp_path), "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr
