"""Token generation over the decoder interface, text-agnostic and backend-agnostic.

A decoder has `new_cache(batch, max_len)`, `prefill(embeds_chunk, cache, attention_mask_chunk) ->
logits [B, V]` (of the chunk's last position) and `decode(token_ids [B], cache) -> logits [B, V]`,
logits as float32 numpy. The torch model (`VL2Model`) and the ONNX Runtime sessions both are one.
`generate` yields the new token ids step by step; stopping on eos is per row. Per step it can also
apply a `Constraint` (a grammar's allowed-token mask, vl2edge/structured.py; one row), report each step's
adjusted logits and choice to `observe` (logprobs), and stop between steps when `cancelled()` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from .config import VL2Config
from .sampling import SamplingParams, adjust, choose

DEFAULT_CHUNK = 512


class Decoder(Protocol):
    """What generation drives: `VL2Model` (torch) and `OnnxModel` (ONNX Runtime). The cache is the
    decoder's own object (KVCache, OnnxCache), opaque to the loop."""

    def new_cache(self, batch: int, max_len: int) -> Any: ...

    def prefill(self, embeds: Any, cache: Any, attention_mask: Any = None) -> np.ndarray:
        """Append a chunk of embeddings [B, T, D]; float32 logits of its last position [B, V]."""
        ...

    def decode(self, token_ids: Any, cache: Any) -> np.ndarray:
        """Feed one token per row [B]; float32 logits of the next position [B, V]."""
        ...


class Backend(Decoder, Protocol):
    """A decoder that also embeds prompts and knows its model (what `vl2edge.pipeline.Pipeline` runs)."""

    @property
    def config(self) -> VL2Config: ...

    def embed(self, input_ids: Any, images: Any = None, images_seq_mask: Any = None,
              images_spatial_crop: Any = None) -> Any:
        """Token embeddings [B, T, D] with the image features in the `images_seq_mask` positions."""
        ...


def prefill(decoder: Decoder, embeds, attention_mask: np.ndarray, cache, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """Run the prompt through the decoder in chunks of `chunk_size` positions; logits of the last one."""
    T = attention_mask.shape[1]
    logits = None
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        logits = decoder.prefill(embeds[:, start:end], cache, attention_mask[:, start:end])
    assert logits is not None  # a prompt has at least one position
    return logits


class Constraint(Protocol):
    """Rules over the next token that follow the answer so far (one row): a grammar."""

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """Adjusted logits [1, V] -> the same with the excluded tokens at -inf."""
        ...

    def consume(self, token: int) -> None:
        """The token chosen."""
        ...


def generate(decoder: Decoder, embeds, attention_mask: np.ndarray, *, max_new_tokens: int, eos_id: int | None,
             params: SamplingParams | None = None, rng: np.random.Generator | None = None,
             prompt_ids: np.ndarray | None = None, chunk_size: int = DEFAULT_CHUNK,
             constraint: Constraint | None = None, observe: Callable[[np.ndarray, np.ndarray], None] | None = None,
             cancelled: Callable[[], bool] | None = None) -> Iterator[np.ndarray]:
    """Yield the next token of every row [B] until all rows produced eos or max_new_tokens is reached.

    A row that has finished keeps yielding eos. `prompt_ids` feed the repetition penalty's history.
    `constraint` (B = 1) masks each step's logits; `observe(logits, tokens)` sees each step's adjusted (and
    masked) logits [B, V] and its choice [B]; `cancelled()` is asked before the prompt and after every step.
    """
    B, T = attention_mask.shape
    rng = rng if rng is not None else np.random.default_rng()
    params = params or SamplingParams()
    if constraint is not None and B != 1:
        raise ValueError("a constraint applies to one row")
    if max_new_tokens <= 0 or (cancelled is not None and cancelled()):
        return
    cache = decoder.new_cache(B, T + max_new_tokens)
    logits = prefill(decoder, embeds, attention_mask, cache, chunk_size)
    seen = [np.asarray(prompt_ids[b][attention_mask[b]]) if prompt_ids is not None else np.zeros(0, np.int64)
            for b in range(B)]
    answer: list[np.ndarray] = [np.zeros(0, np.int64) for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    for step in range(max_new_tokens):
        x = adjust(logits, params, seen, answer)
        if constraint is not None:
            x = constraint.mask(x)
        tok = choose(x, params, rng)
        if eos_id is not None:
            tok = np.where(done, eos_id, tok)
            done |= tok == eos_id
        if observe is not None:
            observe(x, tok)
        if constraint is not None:
            constraint.consume(int(tok[0]))
        yield tok
        if done.all() or step == max_new_tokens - 1 or (cancelled is not None and cancelled()):
            return
        seen = [np.append(s, t) for s, t in zip(seen, tok)]
        answer = [np.append(a, t) for a, t in zip(answer, tok)]
        logits = decoder.decode(tok, cache)
