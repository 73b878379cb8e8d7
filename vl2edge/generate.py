"""Token generation over the decoder interface, text-agnostic and backend-agnostic.

A decoder has `new_cache(batch, max_len)`, `prefill(embeds_chunk, cache, attention_mask_chunk) ->
logits [B, V]` (of the chunk's last position) and `decode(token_ids [B], cache) -> logits [B, V]`,
logits as float32 numpy. The torch model (`VL2Model`) and the ONNX Runtime sessions both are one.
`generate` yields the new token ids step by step; stopping on eos is per row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from .sampling import SamplingParams, sample

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
    """A decoder that also embeds prompts (what `vl2edge.pipeline.Pipeline` runs)."""

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


def generate(decoder: Decoder, embeds, attention_mask: np.ndarray, *, max_new_tokens: int, eos_id: int | None,
             params: SamplingParams | None = None, rng: np.random.Generator | None = None,
             prompt_ids: np.ndarray | None = None, chunk_size: int = DEFAULT_CHUNK) -> Iterator[np.ndarray]:
    """Yield the next token of every row [B] until all rows produced eos or max_new_tokens is reached.

    A row that has finished keeps yielding eos. `prompt_ids` feed the repetition penalty's history.
    """
    B, T = attention_mask.shape
    rng = rng if rng is not None else np.random.default_rng()
    params = params or SamplingParams()
    if max_new_tokens <= 0:
        return
    cache = decoder.new_cache(B, T + max_new_tokens)
    logits = prefill(decoder, embeds, attention_mask, cache, chunk_size)
    seen = [np.asarray(prompt_ids[b][attention_mask[b]]) if prompt_ids is not None else np.zeros(0, np.int64)
            for b in range(B)]
    done = np.zeros(B, dtype=bool)
    for step in range(max_new_tokens):
        tok = sample(logits, params, rng, seen)
        if eos_id is not None:
            tok = np.where(done, eos_id, tok)
            done |= tok == eos_id
        yield tok
        if done.all() or step == max_new_tokens - 1:
            return
        seen = [np.append(s, t) for s, t in zip(seen, tok)]
        logits = decoder.decode(tok, cache)
