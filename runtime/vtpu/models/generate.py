"""The LLM engine: one scheduler thread per loaded decoder, continuous batching over its KV cache.

A request (prompt token ids + `SamplingParams`) is checked and admitted by `Engine.submit` on the
event loop, which answers at once: 400 when it can never be served (prompt + max_tokens over the
context, or more KV pages than the whole cache holds), 429 with the reason when the node is full
now (all `max_sequences` taken, or the cache pages it needs are reserved by others). An admitted
request holds a sequence slot and the pages of its whole length (prompt + max_tokens) until it
ends, so a running stream never runs out of cache.

The scheduler thread loops: it prefills the oldest waiting request by one chunk of at most
`prefill_chunk` tokens (a long prompt is spread over several iterations, so the streams already
running keep their pace), then runs ONE batched decode step for every active sequence (the model
puts their rows through each Linear together). Sequences join after their prefill and leave when
they stop, between steps. Each sampled token goes through the request's stop rules (eos ids,
`max_tokens`, stop strings on the decoded text, trimmed as OpenAI trims them) and is handed to the
request's asyncio queue with `loop.call_soon_threadsafe`.

Sampling per sequence: greedy (argmax, first of equals, as torch) at temperature 0; otherwise
softmax(logits / temperature), restricted to the smallest top-p set, drawn with the request's own
numpy Generator (seeded by `seed`, so a seed reproduces its tokens on the same node). Tokens
under e^-30 of the best one's probability are left out (< 1e-8 of the mass at 150k tokens), and
the top-p set is found by binning the mass rather than sorting the vocabulary: ~1-3 ms a token
at 152k tokens instead of a 10+ ms sort. Log-probabilities are those of the model's raw logits
(log_softmax before temperature), as vLLM reports them.

Failure: an exception in a step fails that step's requests (500 with the reason) and frees their
pages; the thread keeps serving. `Handle.cancel()` (client gone, stream closed) drops a waiting
request at once and an active one at the next step boundary, returning its pages to the cache.
`Engine.stop()` (model unloaded, agent stopping) fails every request with 503.

Contract: docs/architecture.md, "LLM decoding (Qwen3)".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vtpu.models import ModelError

log = logging.getLogger("vtpu.models.generate")

RETRY_AFTER_SECONDS = 1
_NEGLIGIBLE = 30.0  # log-probability below the best token's that sampling leaves out
_NUCLEUS_BINS = 2048
PREFILL_CHUNK = 512  # prompt tokens per prefill call: bounds its working memory and its stall
# Tokens of the prompt's tail decoded ahead of the output, so the first output token's text is
# what it reads after the prompt (a leading space, a word piece), as vLLM detokenizes.
_DETOKENIZE_CONTEXT = 5
_ids = itertools.count(1)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top-k alternatives per token; None: no log-probabilities


@dataclass
class TokenOut:
    """One generated token: its id, and when logprobs were asked its log-probability, its text
    (for the logprobs' `tokens`), where its text starts in the completion, and the top-k."""

    id: int
    logprob: float | None = None
    text: str | None = None
    text_offset: int = 0
    top: list[tuple[int, str, float]] | None = None  # (id, text, logprob), best first


@dataclass
class Update:
    """What one step produced for a request: its new tokens, the text now released (text that
    could still become a stop string is held back), and finish_reason on the last update."""

    tokens: list[TokenOut]
    text: str
    finish_reason: str | None = None


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    handle: Handle
    pages: int  # reserved for prompt + max_tokens
    rng: np.random.Generator
    seq: Any = None  # the model's Sequence once prefill starts
    prefilled: int = 0  # prompt tokens in the cache
    next_id: int | None = None  # sampled, not yet fed to the model
    output: list[int] = field(default_factory=list)
    detok: _Detokenizer | None = None
    released: int = 0  # chars of detok.text handed out
    done: bool = False


class Handle:
    """The request's side on the event loop: `events` receives `Update`s, then a last one with
    finish_reason, or a ModelError."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, prompt_tokens: int) -> None:
        self.engine = engine
        self.loop = loop
        self.prompt_tokens = prompt_tokens
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.request: _Request | None = None

    def _deliver(self, item: Update | ModelError) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def cancel(self) -> None:
        """The caller went away: free the request's slot and pages (idempotent)."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.engine._cancelled(self)


class _Detokenizer:
    """Incremental text of generated ids: only what decodes to complete characters is added."""

    def __init__(self, tokenizer: Any, prompt: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt[-_DETOKENIZE_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""  # an incomplete UTF-8 sequence so far: wait for the next token

    def flush(self) -> str:
        """At the end: whatever is left, replacement characters included."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        delta = full[len(prefix) :] if full.startswith(prefix) else ""
        self.text += delta
        self.read_offset = self.prefix_offset = len(self.ids)
        return delta


def _best_first(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """idx ordered by values[idx] descending, equal values by index (as torch.topk on CPU)."""
    return idx[np.lexsort((idx, -values[idx]))]


def top_indices(row: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries of a row of logits, best first. A vocabulary is ~150k wide: a
    threshold below the best narrows it to a few candidates before anything is ranked."""
    k = min(k, row.size)
    best = row.max()
    for width in (1.0, 4.0, 16.0):
        candidates = np.flatnonzero(row >= best - width)
        if candidates.size >= k:
            break
    else:
        candidates = np.arange(row.size)
    if candidates.size > k:
        candidates = candidates[np.argpartition(-row[candidates], k - 1)[:k]]
    return _best_first(row, candidates)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token from one row of logits (see the module docstring)."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    # Tokens more than _NEGLIGIBLE (in units of temperature) below the best have a probability
    # under e^-30 of its: together < 152k x 1e-13 of the mass. Leaving them out spares the exp
    # and the cumulative sum over the whole vocabulary.
    best = logits.max()
    candidates = np.flatnonzero(logits >= best - _NEGLIGIBLE * params.temperature)
    z = (logits[candidates] - best).astype(np.float64) / params.temperature
    p = np.exp(z)
    if params.top_p < 1.0:
        keep = _nucleus(-z, p, params.top_p)
        candidates, p = candidates[keep], p[keep]
    cdf = np.cumsum(p)
    pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(candidates[min(pick, candidates.size - 1)])


def _nucleus(depth: np.ndarray, p: np.ndarray, top_p: float) -> np.ndarray:
    """Indices into p of the smallest set of most probable tokens holding top_p of the mass.
    depth = -log(p / p.max()) in [0, _NEGLIGIBLE]. Without a sort of the vocabulary (a random
    model's flat distribution would need all of it): the mass is binned by depth, the bins
    wholly inside the nucleus are taken, and only the boundary bin is ranked."""
    bins = np.minimum((depth * (_NUCLEUS_BINS / _NEGLIGIBLE)).astype(np.int64), _NUCLEUS_BINS - 1)
    cum = np.cumsum(np.bincount(bins, weights=p, minlength=_NUCLEUS_BINS))
    target = top_p * cum[-1]
    edge = min(int(np.searchsorted(cum, target)), _NUCLEUS_BINS - 1)
    inside = np.flatnonzero(bins < edge)
    boundary = np.flatnonzero(bins == edge)
    boundary = _best_first(p, boundary)
    before = cum[edge - 1] if edge else 0.0
    need = int(np.searchsorted(before + np.cumsum(p[boundary]), target)) + 1
    return np.concatenate([inside, boundary[:need]])


def log_softmax_top(
    logits: np.ndarray, token: int, k: int
) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) and the k most likely tokens with theirs, from raw logits."""
    best = float(logits.max())
    shifted = np.exp(logits - np.float32(best))  # float32 exp; the sum in float64
    lse = best + float(np.log(shifted.sum(dtype=np.float64)))
    top = [(int(i), float(logits[i]) - lse) for i in top_indices(logits, k)] if k > 0 else []
    return float(logits[token]) - lse, top


@dataclass
class EngineStats:
    requests: int = 0  # admitted
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    refused: int = 0  # 429
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sequences summed over decode steps
    largest_batch: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class Engine:
    """Serves one loaded decoder (a vtpu.models.qwen3.Qwen3Model) to concurrent requests."""

    def __init__(
        self, model: Any, *, name: str, max_sequences: int = 8, prefill_chunk: int = PREFILL_CHUNK
    ) -> None:
        self.model = model
        self.name = name
        self.max_sequences = max_sequences
        self.prefill_chunk = prefill_chunk
        self.context = int(model.config.max_position)
        self.vocab = int(model.config.vocab)
        self.eos = frozenset(int(t) for t in model.eos_token_ids)
        self.tokenizer = model.tokenizer
        self.stats = EngineStats()
        self._pages_total = int(model.cache_stats()["pages_total"])
        self._reserved = 0
        self._waiting: deque[_Request] = deque()  # admitted, prefill not finished
        self._active: list[_Request] = []  # decoding
        self._lock = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"vtpu-llm-{name}", daemon=True)
        self._thread.start()

    # -- the event loop's side -------------------------------------------------------------

    def submit(
        self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop
    ) -> Handle:
        """Admit a request or refuse it with a ModelError (400, 429 or 503) saying why."""
        if not prompt:
            raise ModelError(400, "the prompt is empty: give at least one token", param="prompt")
        bad = next((t for t in prompt if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise ModelError(
                400,
                f"the prompt has token id {bad}, outside {self.name}'s vocabulary [0, {self.vocab})",
                param="prompt",
            )
        total = len(prompt) + params.max_tokens
        if total > self.context:
            raise ModelError(
                400,
                f"{self.name}'s maximum context length is {self.context} tokens; this request "
                f"asks for {total} ({len(prompt)} in the prompt, {params.max_tokens} in the "
                "completion): shorten the prompt or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        pages = int(self.model.pages_needed(total))
        if pages > self._pages_total:
            raise ModelError(
                400,
                f"{total} tokens need {pages} KV-cache pages; this node's cache for {self.name} "
                f"has {self._pages_total} in all (--kv-cache-bytes): shorten the prompt or lower "
                "max_tokens",
                param="max_tokens",
                code="cache_too_small",
            )
        handle = Handle(self, loop, len(prompt))
        seed = params.seed
        with self._lock:
            if self._stopped:
                raise ModelError(503, f"{self.name} is being unloaded", code="model_unloaded")
            busy = len(self._waiting) + len(self._active)
            if busy >= self.max_sequences:
                self.stats.refused += 1
                raise ModelError(
                    429,
                    f"{self.name} is serving its maximum of {self.max_sequences} concurrent "
                    f"sequences (--max-sequences); retry in {RETRY_AFTER_SECONDS} s",
                    code="too_many_sequences",
                )
            free = self._pages_total - self._reserved
            if pages > free:
                self.stats.refused += 1
                raise ModelError(
                    429,
                    f"the KV cache of {self.name} is full: this request needs {pages} pages "
                    f"({total} tokens), {free} of {self._pages_total} are free while {busy} "
                    f"sequence(s) run; retry in {RETRY_AFTER_SECONDS} s or lower max_tokens",
                    code="cache_full",
                )
            self._reserved += pages
            request = _Request(
                id=next(_ids),
                prompt=list(prompt),
                params=params,
                handle=handle,
                pages=pages,
                rng=np.random.default_rng(seed),
            )
            if self.tokenizer is not None:
                request.detok = _Detokenizer(self.tokenizer, request.prompt)
            handle.request = request
            self._waiting.append(request)
            self.stats.requests += 1
            self._lock.notify()
        return handle

    def _cancelled(self, handle: Handle) -> None:
        request = handle.request
        if request is None:
            return
        with self._lock:
            if request in self._waiting and request.seq is None:
                # Not started: nothing of it is in the cache, drop it now.
                self._waiting.remove(request)
                self._release(request)
                self.stats.cancelled += 1
            else:
                self._lock.notify()  # the thread drops it at the next step boundary

    def snapshot(self) -> dict[str, Any]:
        """The engine's counters and the cache's pages (telemetry)."""
        s = self.stats
        cache = self.model.cache_stats()
        with self._lock:
            active, waiting, reserved = len(self._active), len(self._waiting), self._reserved
        return {
            "requests": s.requests,
            "finished": s.finished,
            "failed": s.failed,
            "cancelled": s.cancelled,
            "refused": s.refused,
            "prompt_tokens": s.prompt_tokens,
            "generated_tokens": s.generated_tokens,
            "active_sequences": active,
            "waiting_sequences": waiting,
            "max_sequences": self.max_sequences,
            "decode_steps": s.decode_steps,
            "mean_batch": round(s.decode_rows / s.decode_steps, 3) if s.decode_steps else None,
            "largest_batch": s.largest_batch,
            "decode_tokens_per_s": (
                round(s.decode_rows / s.decode_seconds, 3) if s.decode_seconds else None
            ),
            "prefill_tokens_per_s": (
                round(s.prompt_tokens / s.prefill_seconds, 3) if s.prefill_seconds else None
            ),
            "pages_total": cache["pages_total"],
            "pages_used": cache["pages_used"],
            "pages_reserved": reserved,
            "page_tokens": cache["page_tokens"],
        }

    def stop(self, reason: str = "the model was unloaded") -> None:
        """Fail every request (503) and end the thread; the model's pages are all freed."""
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(60)
        with self._lock:
            for request in [*self._waiting, *self._active]:
                self._fail(
                    request, ModelError(503, f"{self.name}: {reason}", code="model_unloaded")
                )
            self._waiting.clear()
            self._active.clear()

    # -- the scheduler thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                with self._lock:
                    while not self._stopped and not self._waiting and not self._active:
                        self._lock.wait()
                    if self._stopped:
                        return
                    self._drop_cancelled()
                    head = self._waiting[0] if self._waiting else None
                    if head is not None and head.seq is None:
                        # Under the lock: from now on a cancel leaves it to this thread.
                        head.seq = self.model.new_sequence()
                    batch = list(self._active)
                if head is not None:
                    self._prefill_chunk(head)
                if batch:
                    self._decode(batch)
            except Exception as exc:  # a bug of ours: fail what is in flight, keep serving
                log.exception("the engine of %s failed", self.name)
                with self._lock:
                    for request in [*self._waiting, *self._active]:
                        self._fail(request, _internal(self.name, "scheduling", exc))
                    self._waiting.clear()
                    self._active.clear()

    def _drop_cancelled(self) -> None:
        """Under the lock: cancelled requests leave, their pages go back at once."""
        for group in (self._waiting, self._active):
            for request in [r for r in group if r.handle.cancelled.is_set()]:
                group.remove(request)
                self._release(request)
                self.stats.cancelled += 1

    def _release(self, request: _Request) -> None:
        """Under the lock: free the request's sequence and its page reservation (once)."""
        if request.done:
            return
        request.done = True
        if request.seq is not None:
            self.model.free(request.seq)
        self._reserved -= request.pages

    def _fail(self, request: _Request, error: ModelError) -> None:
        self._release(request)
        self.stats.failed += 1
        request.handle._deliver(error)

    def _prefill_chunk(self, request: _Request) -> None:
        start = time.perf_counter()
        try:
            chunk = request.prompt[request.prefilled : request.prefilled + self.prefill_chunk]
            logits = self.model.prefill(request.seq, chunk)
            request.prefilled += len(chunk)
            self.stats.prompt_tokens += len(chunk)
            self.stats.prefill_seconds += time.perf_counter() - start
            if request.prefilled < len(request.prompt):
                return
            with self._lock:
                if request in self._waiting:
                    self._waiting.remove(request)
                if request.done:  # stopped meanwhile
                    return
                self._active.append(request)
            self._emit(request, np.asarray(logits).reshape(-1))
        except Exception as exc:  # this request fails; the engine keeps serving the others
            log.exception("prefill failed for a request on %s", self.name)
            with self._lock:
                if request in self._waiting:
                    self._waiting.remove(request)
                if request in self._active:
                    self._active.remove(request)
                self._fail(request, _internal(self.name, "prefill", exc))

    def _decode(self, batch: list[_Request]) -> None:
        batch = [r for r in batch if not r.done and r.next_id is not None]
        if not batch:
            return
        start = time.perf_counter()
        try:
            logits = self.model.decode([r.seq for r in batch], [r.next_id for r in batch])
        except Exception as exc:  # the step's requests fail; the engine keeps serving
            log.exception("decode step failed on %s", self.name)
            with self._lock:
                for request in batch:
                    if request in self._active:
                        self._active.remove(request)
                    self._fail(request, _internal(self.name, "decode", exc))
            return
        stats = self.stats
        stats.decode_seconds += time.perf_counter() - start
        stats.decode_steps += 1
        stats.decode_rows += len(batch)
        stats.largest_batch = max(stats.largest_batch, len(batch))
        for row, request in enumerate(batch):
            try:
                self._emit(request, logits[row])
            except Exception as exc:
                log.exception("sampling failed on %s", self.name)
                with self._lock:
                    if request in self._active:
                        self._active.remove(request)
                    self._fail(request, _internal(self.name, "sampling", exc))

    def _emit(self, request: _Request, logits: np.ndarray) -> None:
        """Sample the next token from `logits`, apply the stop rules, deliver the update."""
        if request.done:  # the engine was stopped meanwhile
            return
        params = request.params
        token = sample(logits, params, request.rng)
        request.output.append(token)
        self.stats.generated_tokens += 1
        out = TokenOut(token)
        detok = request.detok
        if params.logprobs is not None:
            out.logprob, top = log_softmax_top(logits, token, params.logprobs)
            out.text = self._token_text(token)
            out.top = [(i, self._token_text(i), lp) for i, lp in top]
            out.text_offset = len(detok.text) if detok else 0
        finish = None
        matched = False  # a stop string ended it: the text is already trimmed
        if token in self.eos:
            finish = "stop"
        elif detok is not None:
            before = len(detok.text)
            detok.add(token)
            if params.stop:
                matched = _trim_at_stop(detok, params.stop, before)
                finish = "stop" if matched else None
        if finish is None and len(request.output) >= params.max_tokens:
            finish = "length"
        if finish is not None and detok is not None and not matched:
            detok.flush()
        text = ""
        if detok is not None:
            hold = 0 if finish else max((len(s) for s in params.stop), default=1) - 1
            end = max(request.released, len(detok.text) - hold)
            text = detok.text[request.released : end]
            request.released = end
        if finish is not None:
            with self._lock:
                if request in self._active:
                    self._active.remove(request)
                self._release(request)
                self.stats.finished += 1
        else:
            request.next_id = token
        request.handle._deliver(Update([out], text, finish))

    def _token_text(self, token: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token}"
        return self.tokenizer.decode([token], skip_special_tokens=False)


def _trim_at_stop(detok: _Detokenizer, stops: tuple[str, ...], before: int) -> bool:
    """Cut detok.text where the first stop string begins, if one appeared in the text added
    since `before` chars (a stop may straddle tokens); True when one did."""
    text = detok.text
    first = None
    for stop in stops:
        at = text.find(stop, max(0, before - len(stop) + 1))
        if at >= 0 and (first is None or at < first):
            first = at
    if first is None:
        return False
    detok.text = text[:first]
    return True


def _internal(name: str, what: str, exc: Exception) -> ModelError:
    return ModelError(
        500,
        f"{name} failed during {what} ({type(exc).__name__}: {exc}); the request was stopped "
        "and the node keeps serving",
        code="internal_error",
    )
