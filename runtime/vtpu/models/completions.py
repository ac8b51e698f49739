"""`POST /v1/completions` and `POST /v1/chat/completions`, OpenAI-compatible, on the LLM engine.

Requests are parsed and checked here (`parse_completion`, `parse_chat`: unknown fields, `n` other
than 1, `echo`, out-of-range values are 400s naming the field), turned into prompt token ids
(`prompt_ids`: a completions prompt is a string, a list of ids, or a list holding one of those;
chat messages are rendered with the tokenizer's chat template as `transformers`'
`apply_chat_template(..., add_generation_prompt=True)` renders them, in a Jinja sandbox), handed
to the model's `vtpu.models.generate.Engine`, and its updates shaped into OpenAI's answers: one
JSON document, or server-sent events (`data: {...}` per token, then `data: [DONE]`). Each choice
carries `token_ids` (the generated ids, as vLLM returns them), so a model without a tokenizer is
usable with token-id prompts. An error after a stream has started is sent as a last
`data: {"error": {...}}` event, which the `openai` client raises.

Contract: docs/architecture.md, "LLM decoding (Qwen3)".
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtpu.models import LoadedModel, ModelError
from vtpu.models.generate import Handle, SamplingParams, TokenOut, Update

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 512  # a chat without max_tokens: this, or what the context has left
MAX_LOGPROBS = 20
MAX_STOPS = 4

_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "user",
    "frequency_penalty",
    "presence_penalty",
}
_COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of"}
_CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class GenerationRequest:
    chat: bool
    model: str
    prompt: str | list[int] | None  # completions
    messages: list[dict[str, Any]] | None  # chat
    max_tokens: int | None  # None: the endpoint's default
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    logprobs: int | None  # top-k alternatives; None: no logprobs
    stream: bool
    include_usage: bool


def _bad(message: str, param: str | None = None) -> ModelError:
    return ModelError(400, message, param=param)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _common(body: Any, fields: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise _bad(
            f"unsupported fields {unknown}; this endpoint takes {sorted(fields)}", unknown[0]
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required: the id of a model loaded on this node", "model")
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("'n' must be 1: this node returns one choice per request", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0):
            raise _bad(f"'{name}' is not supported; omit it or send 0", name)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("'user' must be a string", "user")
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 1.0
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise _bad("'temperature' must be a number from 0 to 2", "temperature")
    top_p = body.get("top_p")
    if top_p is None:
        top_p = 1.0
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise _bad("'top_p' must be a number in (0, 1]", "top_p")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise _bad("'seed' must be a non-negative integer", "seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise _bad("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise _bad(f"'stop' has {len(stops)} strings; at most {MAX_STOPS}", "stop")
    if any(not s for s in stops):
        raise _bad("'stop' strings must not be empty", "stop")
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(options, dict) or not set(options) <= {"include_usage"}:
            raise _bad("'stream_options' takes only {\"include_usage\": bool}", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("'stream_options.include_usage' must be true or false", "stream_options")
    return {
        "model": model,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "seed": seed,
        "stop": stops,
        "stream": stream,
        "include_usage": include_usage,
    }


def _max_tokens(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise _bad(f"'{name}' must be a positive integer", name)
    return value


def parse_completion(body: Any) -> GenerationRequest:
    common = _common(body, _COMPLETION_FIELDS)
    if body.get("echo") not in (None, False):
        raise _bad("'echo' is not supported: the answer holds the completion only", "echo")
    if body.get("best_of") not in (None, 1):
        raise _bad("'best_of' must be 1: this node returns one choice per request", "best_of")
    if "prompt" not in body:
        raise _bad("'prompt' is required: a string or a list of token ids", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, str | list) for p in prompt):
            raise _bad(
                f"'prompt' holds {len(prompt)} prompts; this node takes one per request: send "
                "them as separate (concurrent) requests",
                "prompt",
            )
        if not all(_is_int(t) for t in prompt):
            raise _bad("'prompt' as a list must hold integer token ids", "prompt")
    elif not isinstance(prompt, str):
        raise _bad("'prompt' must be a string or a list of token ids", "prompt")
    if not prompt:
        raise _bad("'prompt' is empty", "prompt")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise _bad(f"'logprobs' must be an integer from 0 to {MAX_LOGPROBS}", "logprobs")
    return GenerationRequest(
        chat=False,
        prompt=prompt,
        messages=None,
        max_tokens=_max_tokens(body, "max_tokens"),
        logprobs=logprobs,
        **common,
    )


def parse_chat(body: Any) -> GenerationRequest:
    common = _common(body, _CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' is required: a non-empty list of {role, content}", "messages")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise _bad(
                f"'messages'[{i}] must be an object with a 'role' of {', '.join(_ROLES)}",
                "messages",
            )
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise _bad(
                        f"'messages'[{i}] has a content part of type {kind!r}; this model "
                        "reads text only",
                        "messages",
                    )
                if not isinstance(part.get("text"), str):
                    raise _bad(f"'messages'[{i}] has a text part without 'text'", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is not None and not isinstance(content, str):
            raise _bad(f"'messages'[{i}].content must be a string or text parts", "messages")
        plain.append({**message, "content": content})
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _bad("'logprobs' must be true or false", "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= MAX_LOGPROBS:
            raise _bad(
                f"'top_logprobs' must be an integer from 0 to {MAX_LOGPROBS}", "top_logprobs"
            )
        if not logprobs:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = _max_tokens(body, "max_completion_tokens") or _max_tokens(body, "max_tokens")
    return GenerationRequest(
        chat=True,
        prompt=None,
        messages=plain,
        max_tokens=max_tokens,
        logprobs=(top or 0) if logprobs else None,
        **common,
    )


# -- prompts -----------------------------------------------------------------------------------


class ChatTemplate:
    """A tokenizer's chat template, compiled once in a Jinja sandbox with what transformers gives
    templates: raise_exception, strftime_now, the tojson filter without HTML escaping, and the
    special tokens of tokenizer_config.json (bos_token, eos_token, ...)."""

    def __init__(self, source: str, directory: Path) -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(
                x,
                ensure_ascii=ensure_ascii,
                indent=indent,
                separators=separators,
                sort_keys=sort_keys,
            )

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.template = env.from_string(source)
        self.special = _special_tokens(directory)

    def render(self, messages: list[dict[str, Any]]) -> str:
        import jinja2

        try:
            return self.template.render(
                messages=messages, add_generation_prompt=True, **self.special
            )
        except jinja2.exceptions.TemplateError as exc:
            raise _bad(
                f"the model's chat template refused the messages: {exc}", "messages"
            ) from None


def _special_tokens(directory: Path) -> dict[str, str]:
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token"):
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


@functools.lru_cache(maxsize=16)
def _template(source: str, directory: Path) -> ChatTemplate:
    return ChatTemplate(source, directory)


def prompt_ids(model: LoadedModel, request: GenerationRequest) -> list[int]:
    """The request's prompt as token ids (runs in a worker thread: templates and tokenizers take
    a while on long inputs)."""
    llm = model.encoder
    tokenizer = llm.tokenizer
    if not request.chat:
        if isinstance(request.prompt, list):
            return list(request.prompt)
        if tokenizer is None:
            raise _bad(
                f"{model.name} has no tokenizer (no tokenizer.json in its directory): send the "
                "prompt as a list of token ids",
                "prompt",
            )
        return list(tokenizer.encode(request.prompt, add_special_tokens=True).ids)
    if llm.chat_template is None or tokenizer is None:
        missing = "tokenizer" if tokenizer is None else "chat template"
        raise _bad(
            f"{model.name} has no {missing} (tokenizer.json, tokenizer_config.json's "
            "chat_template), so it cannot render chat messages: use /v1/completions with the "
            "prompt rendered as text or token ids",
            "messages",
        )
    text = _template(llm.chat_template, Path(llm.directory)).render(request.messages or [])
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def sampling_params(engine: Any, request: GenerationRequest, prompt_tokens: int) -> SamplingParams:
    max_tokens = request.max_tokens
    if max_tokens is None:
        left = max(1, engine.context - prompt_tokens)
        default = CHAT_DEFAULT_MAX_TOKENS if request.chat else COMPLETION_DEFAULT_MAX_TOKENS
        max_tokens = min(default, left)
    if request.stop and engine.tokenizer is None:
        raise _bad(
            f"'stop' strings need text, and {engine.name} has no tokenizer; omit 'stop'", "stop"
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=request.stop,
        logprobs=request.logprobs,
    )


# -- answers -----------------------------------------------------------------------------------


class _Answer:
    """Accumulates the engine's updates for one request and shapes OpenAI's documents."""

    def __init__(self, model: LoadedModel, request: GenerationRequest, handle: Handle) -> None:
        self.model = model
        self.request = request
        self.handle = handle
        prefix = "chatcmpl" if request.chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if request.chat else "text_completion"
        self.tokens: list[TokenOut] = []
        self.text = ""
        self.finish_reason: str | None = None

    def add(self, update: Update) -> None:
        self.tokens.extend(update.tokens)
        self.text += update.text
        self.finish_reason = update.finish_reason or self.finish_reason

    def usage(self) -> dict[str, int]:
        prompt, completion = self.handle.prompt_tokens, len(self.tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _logprobs(self, tokens: list[TokenOut]) -> dict[str, Any] | None:
        if self.request.logprobs is None:
            return None
        if self.request.chat:
            return {
                "content": [
                    {
                        "token": t.text,
                        "logprob": t.logprob,
                        "bytes": list((t.text or "").encode("utf-8")),
                        "top_logprobs": [
                            {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
                            for _, s, lp in t.top or []
                        ],
                    }
                    for t in tokens
                ]
            }
        return {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{s: lp for _, s, lp in t.top or []} for t in tokens],
            "text_offset": [t.text_offset for t in tokens],
        }

    def _choice(self, text: str, tokens: list[TokenOut], finish: str | None, *, delta: bool):
        choice: dict[str, Any] = {"index": 0}
        if not self.request.chat:
            choice["text"] = text
        elif delta:
            choice["delta"] = {"content": text} if text or not finish else {}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = self._logprobs(tokens)
        choice["finish_reason"] = finish
        choice["token_ids"] = [t.id for t in tokens]
        return choice

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model.name,
            "choices": [self._choice(self.text, self.tokens, self.finish_reason, delta=False)],
            "usage": self.usage(),
        }

    def chunk(self, choices: list[dict[str, Any]], usage: dict | None = None) -> str:
        doc = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.request.chat else "text_completion",
            "created": self.created,
            "model": self.model.name,
            "choices": choices,
        }
        if self.request.include_usage:
            doc["usage"] = usage
        return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"

    def first_chunk(self) -> str | None:
        if not self.request.chat:
            return None
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return self.chunk([choice])

    def update_chunk(self, update: Update) -> str:
        choice = self._choice(update.text, update.tokens, update.finish_reason, delta=True)
        return self.chunk([choice])


def _stats_done(model: LoadedModel, answer: _Answer) -> None:
    stats = model.stats
    stats.requests += 1
    stats.inputs += 1
    stats.tokens += answer.handle.prompt_tokens + len(answer.tokens)


async def complete(model: LoadedModel, request: GenerationRequest, handle: Handle) -> dict:
    """Wait for the whole answer (raises the engine's ModelError)."""
    answer = _Answer(model, request, handle)
    try:
        while answer.finish_reason is None:
            item = await handle.events.get()
            if isinstance(item, ModelError):
                raise item
            answer.add(item)
    finally:
        handle.cancel()  # a no-op once finished; frees the pages when the caller went away
    _stats_done(model, answer)
    return answer.document()


def _error_event(exc: ModelError) -> str:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    error = {"message": str(exc), "type": kind, "param": exc.param, "code": exc.code}
    return f"data: {json.dumps({'error': error}, ensure_ascii=False)}\n\n"


async def stream(
    model: LoadedModel, request: GenerationRequest, handle: Handle
) -> AsyncIterator[str]:
    """Server-sent events for the answer; closing the stream (the client left) cancels it."""
    answer = _Answer(model, request, handle)
    try:
        first = answer.first_chunk()
        if first:
            yield first
        while answer.finish_reason is None:
            item = await handle.events.get()
            if isinstance(item, ModelError):
                yield _error_event(item)
                break
            answer.add(item)
            yield answer.update_chunk(item)
        else:
            _stats_done(model, answer)
            if request.include_usage:
                yield answer.chunk([], answer.usage())
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()


async def wait_disconnect(receive: Any) -> None:
    """Returns when the client has gone away (the ASGI receive channel says so)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def complete_unless_disconnected(
    model: LoadedModel, request: GenerationRequest, handle: Handle, receive: Any
) -> dict | None:
    """`complete`, cancelled (pages freed, None returned) when the client leaves first."""
    work = asyncio.ensure_future(complete(model, request, handle))
    gone = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # the client left, or the agent is stopping
            work.cancel()
            handle.cancel()
    return work.result() if not work.cancelled() else None
