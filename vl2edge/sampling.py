"""Next-token choice from float32 logits [B, V] with an explicit `numpy.random.Generator`.

The order is the Hugging Face one the reference's `generate` uses: repetition penalty (also under
greedy), then temperature, then top-p (nucleus, keeping at least one token). temperature 0 is greedy,
and so is top_p 0 (only the most likely token is kept). OpenAI's options come before temperature:
frequency and presence penalties over the tokens generated so far (logit -= count * frequency +
(count > 0) * presence) and `logit_bias` (added per token id). `adjust` is everything before the
choice (what logprobs are reported from, and where a grammar mask is applied); `choose` is the choice;
`sample` is both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

MAX_BIAS = 100  # logit_bias values lie in [-MAX_BIAS, MAX_BIAS] (OpenAI's range)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise InputError(f"{name} must be a finite number, got {v!r}")
        if not (0 <= self.temperature <= 100):
            raise InputError(f"temperature must be >= 0 (and at most 100), got {self.temperature}")
        if not (0 <= self.top_p <= 1):
            raise InputError(f"top_p must be in [0, 1], got {self.top_p}")
        if not (0 < self.repetition_penalty <= 100):
            raise InputError(f"repetition_penalty must be > 0 (and at most 100), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InputError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for tok, bias in self.logit_bias:
            number = isinstance(bias, (int, float)) and -MAX_BIAS <= bias <= MAX_BIAS
            if not (isinstance(tok, int) and tok >= 0 and number):
                raise InputError(f"logit_bias maps token ids to biases in [-{MAX_BIAS}, {MAX_BIAS}], got {tok!r}: "
                                 f"{bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p == 0


def apply_repetition_penalty(logits: np.ndarray, seen: list[np.ndarray], penalty: float) -> np.ndarray:
    """Divide positive / multiply negative logits of every token already in the row's history."""
    out = logits.copy()
    for b, ids in enumerate(seen):
        ids = np.unique(ids)
        v = out[b, ids]
        out[b, ids] = np.where(v < 0, v * penalty, v / penalty)
    return out


def top_p_filter(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Set to -inf the tokens outside the smallest set whose probability reaches top_p."""
    order = np.argsort(logits, axis=-1, kind="stable")                     # ascending
    srt = np.take_along_axis(logits, order, axis=-1)
    p = np.exp(srt - srt[:, -1:])
    cum = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
    drop = cum <= (1 - top_p)
    drop[:, -1] = False
    out = logits.copy()
    np.put_along_axis(out, order, np.where(drop, -np.inf, srt), axis=-1)
    return out


def adjust(logits: np.ndarray, params: SamplingParams, seen: list[np.ndarray] | None = None,
           generated: list[np.ndarray] | None = None) -> np.ndarray:
    """Everything before the choice: repetition penalty over `seen` (prompt + answer), frequency/presence
    penalties over `generated` (the answer so far), logit_bias. float32 [B, V]."""
    x: np.ndarray = np.asarray(logits, dtype=np.float32)
    if params.repetition_penalty != 1.0 and seen is not None:
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and generated is not None:
        x = x.copy()
        for b, ids in enumerate(generated):
            counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=x.shape[1])[: x.shape[1]]
            x[b] -= counts * params.frequency_penalty + (counts > 0) * params.presence_penalty
    if params.logit_bias:
        x = x.copy()
        for tok, bias in params.logit_bias:
            if tok < x.shape[1]:
                x[:, tok] += bias
    return x


def choose(x: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """One token id per row [B] (int64) from adjusted logits."""
    if params.greedy:
        return x.argmax(-1).astype(np.int64)
    x = x.astype(np.float64) / params.temperature
    if params.top_p < 1.0:
        x = top_p_filter(x, params.top_p)
    p = np.exp(x - x.max(-1, keepdims=True))
    cdf = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
    rows: int = x.shape[0]  # typed: an Any size would pick rng.random's scalar overload
    u = rng.random(rows)
    return np.minimum((cdf < u[:, None]).sum(-1), x.shape[1] - 1).astype(np.int64)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           seen: list[np.ndarray] | None = None, generated: list[np.ndarray] | None = None) -> np.ndarray:
    """One token id per row [B] (int64)."""
    return choose(adjust(logits, params, seen, generated), params, rng)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log-probabilities over the last axis (-inf where x is -inf)."""
    z = x.astype(np.float64) - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
