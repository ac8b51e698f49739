"""`POST /v1/embeddings`, OpenAI-compatible, with dynamic batching of concurrent requests.

Requests are parsed and checked here (`parse_request`), tokenized, and handed to the model's
`Batcher`: requests that arrive within a short window (`--embedding-batch-window-ms`) share one
forward, up to `max_batch_tokens` padded positions per forward, so concurrent callers get the
throughput of a large batch. One forward runs at a time per model, in a worker thread; the
requests that arrive meanwhile make up the next batch.

Inputs: a string, a list of strings, a list of token ids or a list of such lists (ids are taken
as they are, with no [CLS]/[SEP] added: pass what the model's tokenizer produces). Inputs longer
than the model's max_tokens are truncated as sentence-transformers truncates, unless the request
says `"truncate": false` (our extension), which makes them a 400.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vtpu.models import LoadedModel, ModelError

_FIELDS = {"input", "model", "encoding_format", "dimensions", "user", "truncate"}


@dataclass
class EmbeddingRequest:
    model: str
    texts: list[str] | None  # None when the input is token ids
    token_ids: list[list[int]] | None
    encoding_format: str
    truncate: bool


def _bad(message: str, param: str | None = None) -> ModelError:
    return ModelError(400, message, param=param)


def parse_request(body: Any, max_inputs: int) -> EmbeddingRequest:
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise _bad(
            f"unsupported fields {unknown}; this endpoint takes {sorted(_FIELDS)}", unknown[0]
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required: the id of a model loaded on this node", "model")
    if body.get("dimensions") is not None:
        raise _bad(
            "'dimensions' is not supported: this node's embedding models have a fixed size "
            "and are not trained to be shortened; omit it",
            "dimensions",
        )
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _bad(
            f"'encoding_format' must be 'float' or 'base64', not {encoding!r}", "encoding_format"
        )
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool):
        raise _bad("'truncate' must be true or false", "truncate")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("'user' must be a string", "user")
    if "input" not in body:
        raise _bad("'input' is required: a string, a list of strings, or token ids", "input")
    raw = body["input"]
    texts: list[str] | None = None
    ids: list[list[int]] | None = None
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list):
        if not raw:
            raise _bad("'input' is an empty list; give at least one input", "input")
        if all(isinstance(x, str) for x in raw):
            texts = list(raw)
        elif all(_is_int(x) for x in raw):
            ids = [list(raw)]
        elif all(isinstance(x, list) for x in raw):
            for i, seq in enumerate(raw):
                if not all(_is_int(t) for t in seq):
                    raise _bad(f"'input'[{i}] must be a list of integer token ids", "input")
            ids = [list(seq) for seq in raw]
        else:
            i, bad = next((i, x) for i, x in enumerate(raw) if not isinstance(x, str))
            raise _bad(
                f"'input'[{i}] is {type(bad).__name__ if bad is not None else 'null'}; every "
                "item must be a string (or every item a token id, or a list of token ids)",
                "input",
            )
    else:
        raise _bad(
            f"'input' is {type(raw).__name__ if raw is not None else 'null'}; give a string, "
            "a list of strings, or token ids",
            "input",
        )
    count = len(texts if texts is not None else ids or [])
    if count > max_inputs:
        raise _bad(
            f"'input' has {count} items; this node takes at most {max_inputs} per request: "
            "split it",
            "input",
        )
    return EmbeddingRequest(model, texts, ids, encoding, truncate)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def tokenize(model: LoadedModel, request: EmbeddingRequest) -> list[list[int]]:
    """Token ids per input, checked against the model's vocabulary and length (runs in a worker
    thread: tokenizing thousands of strings takes a while)."""
    encoder = model.encoder
    limit = encoder.config.max_seq_length
    if request.texts is not None:
        if not request.truncate:
            for i, text in enumerate(request.texts):
                count = encoder.token_count(text)
                if count > limit:
                    raise _bad(
                        f"'input'[{i}] has {count} tokens; {model.name} takes at most {limit} "
                        "(send truncate: true, the default, to cut it as sentence-transformers "
                        "does)",
                        "input",
                    )
        return encoder.tokenize(request.texts)
    vocab = encoder.config.vocab
    out = []
    for i, seq in enumerate(request.token_ids or []):
        if not seq:
            raise _bad(f"'input'[{i}] is an empty list of token ids", "input")
        bad = next((t for t in seq if not 0 <= t < vocab), None)
        if bad is not None:
            raise _bad(
                f"'input'[{i}] has token id {bad}, outside the vocabulary [0, {vocab})", "input"
            )
        if len(seq) > limit:
            if not request.truncate:
                raise _bad(
                    f"'input'[{i}] has {len(seq)} tokens; {model.name} takes at most {limit}",
                    "input",
                )
            seq = seq[:limit]
        out.append(seq)
    return out


def response(model: LoadedModel, vectors: np.ndarray, tokens: int, encoding: str) -> dict:
    data = []
    for i, vec in enumerate(vectors):
        if encoding == "base64":
            value: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
        else:
            value = vec.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


class Batcher:
    """Gathers the sequences of concurrent requests for one model into shared forwards."""

    def __init__(self, model: LoadedModel, *, window_seconds: float, max_batch_tokens: int) -> None:
        self.model = model
        self.window = window_seconds
        self.max_batch_tokens = max_batch_tokens
        self._pending: list[tuple[list[list[int]], asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    def _cost(self, sequences: list[list[int]]) -> int:
        return sum(max(1, len(s)) for s in sequences)

    async def submit(self, sequences: list[list[int]]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((sequences, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        import anyio.to_thread

        while self._pending:
            waiting = sum(self._cost(s) for s, _ in self._pending)
            if waiting < self.max_batch_tokens and self.window > 0:
                await asyncio.sleep(self.window)  # let concurrent requests join this batch
            batch, tokens = [], 0
            while self._pending and (not batch or tokens < self.max_batch_tokens):
                item = self._pending.pop(0)
                batch.append(item)
                tokens += self._cost(item[0])
            batch = [(s, f) for s, f in batch if not f.done()]  # callers that went away
            if not batch:
                continue
            sequences = [seq for seqs, _ in batch for seq in seqs]
            start = time.perf_counter()
            try:
                vectors = await anyio.to_thread.run_sync(
                    self.model.encoder.encode_ids, sequences, self.max_batch_tokens
                )
            except Exception as exc:  # handed to every request of the batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            stats = self.model.stats
            stats.busy_seconds += time.perf_counter() - start
            stats.batches += 1
            stats.largest_batch = max(stats.largest_batch, len(sequences))
            if len(batch) > 1:
                stats.batched_requests += len(batch)
            offset = 0
            for seqs, future in batch:
                if not future.done():
                    future.set_result(vectors[offset : offset + len(seqs)])
                offset += len(seqs)
