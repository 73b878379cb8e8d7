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
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .config import VL2Config
from .prefix_cache import Hit
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


@runtime_checkable
class SlotDecoder(Protocol):
    """A decoder whose cache holds `slots` independent rows, each at its own position (what the continuous
    batching engine, vl2edge/engine.py, drives). Rows 0..R-1 are the running ones: `decode_rows` feeds
    one token to each; `prefill_row` appends a prompt chunk to one row; `move_row` keeps the rows dense."""

    def new_slots(self, slots: int, max_len: int) -> Any: ...

    def prefill_row(self, embeds: Any, cache: Any, row: int) -> np.ndarray:
        """Append a chunk [1, T, D] to row `row` (after its own positions); float32 logits [1, V] of its last."""
        ...

    def decode_rows(self, token_ids: np.ndarray, cache: Any) -> np.ndarray:
        """One token for each of rows 0..R-1 ([R], each at its own position); float32 logits [R, V]."""
        ...

    def move_row(self, cache: Any, src: int, dst: int) -> None:
        """Row `src`'s positions become row `dst`'s; `src` is left empty."""
        ...

    def clear_row(self, cache: Any, row: int) -> None:
        """Empty row `row` (its positions are forgotten)."""
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


class Sequence:
    """One row's choices: its sampling parameters, random stream, history (for the penalties), grammar and
    observer. `next(logits)` picks the row's next token; `finished` once it chose eos or its last token.
    `generate` drives one per row of a static batch, `vl2edge.engine.Engine` one per request."""

    def __init__(self, *, max_new_tokens: int, eos_id: int | None, params: SamplingParams | None = None,
                 rng: np.random.Generator | None = None, prompt_ids: np.ndarray | None = None,
                 constraint: Constraint | None = None,
                 observe: Callable[[np.ndarray, np.ndarray], None] | None = None):
        self.max_new_tokens, self.eos_id, self.constraint, self.observe = max_new_tokens, eos_id, constraint, observe
        self.params = params or SamplingParams()
        self.rng = rng if rng is not None else np.random.default_rng()
        self.seen = np.asarray(prompt_ids if prompt_ids is not None else np.zeros(0), np.int64).reshape(-1)
        self.answer = np.zeros(0, np.int64)
        self.finished = False

    def next(self, logits: np.ndarray) -> int:
        """logits [1, V] of the next position -> the chosen token (recorded in the history)."""
        x = adjust(logits, self.params, [self.seen], [self.answer])
        if self.constraint is not None:
            x = self.constraint.mask(x)
        tok = choose(x, self.params, self.rng)
        if self.observe is not None:
            self.observe(x, tok)
        t = int(tok[0])
        if self.constraint is not None:
            self.constraint.consume(t)
        self.seen, self.answer = np.append(self.seen, t), np.append(self.answer, t)
        self.finished = t == self.eos_id or len(self.answer) >= self.max_new_tokens
        return t


def generate(decoder: Decoder, embeds, attention_mask: np.ndarray, *, max_new_tokens: int, eos_id: int | None,
             params: SamplingParams | None = None, rng: np.random.Generator | None = None,
             prompt_ids: np.ndarray | None = None, chunk_size: int = DEFAULT_CHUNK,
             constraint: Constraint | None = None, observe: Callable[[np.ndarray, np.ndarray], None] | None = None,
             cancelled: Callable[[], bool] | None = None, prefix: Hit | None = None,
             on_prefilled: Callable[[Any], None] | None = None) -> Iterator[np.ndarray]:
    """Yield the next token of every row [B] until all rows produced eos or max_new_tokens is reached.

    A row that has finished keeps yielding eos. `prompt_ids` feed the repetition penalty's history.
    `constraint` (B = 1) masks each step's logits; `observe(logits, tokens)` (B = 1) sees each step's adjusted
    (and masked) logits [1, V] and its choice [1]; `cancelled()` is asked before the prompt and after every
    step. The rows share `rng`, drawn row after row. `prefix` (B = 1, vl2edge/prefix_cache.py): the prompt's
    first `prefix.length` positions come from a stored prefix and `embeds` holds only the positions after them;
    `on_prefilled(saved)` receives a copy of the cache's prompt positions once they are all in.
    """
    B, T = attention_mask.shape
    rng = rng if rng is not None else np.random.default_rng()
    if (constraint is not None or observe is not None) and B != 1:
        raise ValueError("a constraint or an observer applies to one row")
    if max_new_tokens <= 0 or (cancelled is not None and cancelled()):
        return
    cache = decoder.new_cache(B, T + max_new_tokens)
    start = 0
    if prefix is not None:
        cache.restore(prefix.saved, prefix.length)
        start = prefix.length
    logits = prefill(decoder, embeds, attention_mask[:, start:], cache, chunk_size)
    if on_prefilled is not None:
        on_prefilled(cache.save(T))
    rows = [Sequence(max_new_tokens=max_new_tokens, eos_id=eos_id, params=params, rng=rng,
                     prompt_ids=None if prompt_ids is None else np.asarray(prompt_ids[b])[attention_mask[b]],
                     constraint=constraint, observe=observe) for b in range(B)]
    for _ in range(max_new_tokens):
        tok = np.array([eos_id if row.finished else row.next(logits[b:b + 1]) for b, row in enumerate(rows)],
                       dtype=np.int64)
        yield tok
        if all(row.finished for row in rows) or (cancelled is not None and cancelled()):
            return
        logits = decoder.decode(tok, cache)
