"""Structured output: JSON that parses and matches a schema, by constrained decoding over llguidance.

`JsonFormat.from_schema(schema)` / `JsonFormat.any_object()` compile a response format once (a schema
the library cannot compile is an `InputError` with its reason). `JsonFormat.constraint(vocab, budget)`
starts one answer's `JsonConstraint`, which the generation loop asks for an allowed-token mask before
each sample and tells the chosen token after it (`vl2edge.generate.Constraint`), so both backends get it.

An answer must also *end* inside its token budget, which a weak or random-weight model never does by
itself (its strings run on). So the constraint keeps a closing plan: it simulates, on a copy of the
matcher, the shortest way it knows to finish — at each step the allowed token that closes most: inside a
string one with a quote; outside, `}` and `]`, then a separator `,` `:` (which ends a number), then a
quote, then the longest token that opens nothing (`string_state` follows the quotes of the text so far
to tell inside from outside; validity is always the grammar's) — every CHECK_EVERY tokens, and once the
tokens left are within NEAR x that plan's length (plus slack for the plan's growth between
measurements), it follows the plan to the end. An answer whose budget holds the plan ends as valid JSON.

Strings are generated without raw control characters (the JSON grammar's string lexer refuses them;
`tests/test_structured.py` parses every output with Python's strict `json.loads`). Whitespace outside
strings is not allowed (`whitespace_flexible` off): a random model would otherwise spend its budget on it.
`TokenVocabulary.of(processor, n_vocab)` builds the library's tokenizer from our `tokenizers` JSON once
per processor (cached), with each token's closing rank.

Dimension legend: V vocabulary (the model's logits width).
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

CLOSE_RANKS = {"}": 3, "]": 3, ",": 1, ":": 1, '"': 0.5}  # outside strings: the plan's preferences
CHECK_EVERY = 8     # tokens between closing-plan measurements
NEAR = 2            # closing starts with NEAR x the plan's length (+ 2 x CHECK_EVERY) tokens left
MAX_PLAN = 512      # a closing plan longer than this is given up for the answer (a pathological schema)
_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy
    except ImportError:
        raise InputError("structured output (response_format, --json-schema) needs llguidance: "
                         "pip install llguidance") from None
    return llguidance


def string_state(in_string: bool, escaped: bool, text: str) -> tuple[bool, bool]:
    """Whether the text so far ends inside a JSON string (and after a backslash there), given `text` next.
    Only for the closing plan's preferences: validity is the grammar's."""
    for c in text:
        if escaped:
            escaped = False
        elif in_string and c == "\\":
            escaped = True
        elif c == '"':
            in_string = not in_string
    return in_string, escaped


@dataclass(frozen=True)
class TokenVocabulary:
    """The library's tokenizer for our tokenizer, each token's text, and the closing plan's preferences:
    `outside` [V] (CLOSE_RANKS of a token's last closer, + length / 1e4; length / 1e4 for a token with none;
    -1 for one that opens an object or array) and `inside` [V] (in a string: 3 for a token with a quote,
    which ends it, else length / 1e4)."""

    tokenizer: Any
    texts: tuple[str, ...]
    outside: np.ndarray
    inside: np.ndarray
    eos_id: int
    punct: np.ndarray  # bool [V]: one character, not a letter or digit (what patterns gate on: @ . - : T ...)

    @classmethod
    def of(cls, processor, n_vocab: int) -> TokenVocabulary:
        cached = _VOCABS.get(processor)
        if cached is not None and cached.outside.shape[0] == n_vocab:
            return cached
        llg = _llguidance()
        tok = llg.LLTokenizer(processor.tokenizer.to_str(), n_vocab=n_vocab, eos_token=processor.eos_id)
        known = min(n_vocab, processor.tokenizer.get_vocab_size(with_added_tokens=True))
        texts = tuple(processor.decode([i]) for i in range(known)) + ("",) * (n_vocab - known)
        outside, inside = np.full(n_vocab, -1.0), np.zeros(n_vocab)
        for i, text in enumerate(texts):
            closers = [CLOSE_RANKS[c] for c in text if c in CLOSE_RANKS]
            if closers:
                outside[i] = closers[-1] + len(text) / 1e4
            elif not any(c in "{[" for c in text):
                outside[i] = len(text) / 1e4
            inside[i] = 3.0 if '"' in text else len(text) / 1e4
        punct = np.array([len(t) == 1 and not t.isalnum() for t in texts])
        vocab = cls(tok, texts, outside, inside, processor.eos_id, punct)
        _VOCABS[processor] = vocab
        return vocab


@dataclass(frozen=True)
class JsonFormat:
    """A compiled response format (the library's grammar text), checked at construction."""

    grammar: str
    name: str

    @classmethod
    def from_schema(cls, schema: Any, name: str = "json_schema") -> JsonFormat:
        if not isinstance(schema, dict):
            raise InputError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                             defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as e:
            raise InputError(f"the JSON schema cannot be compiled: {e}") from None
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise InputError(f"the JSON schema cannot be compiled: {messages[0][:500]}")
        return cls(grammar, name)

    @classmethod
    def any_object(cls) -> JsonFormat:
        """`{"type": "json_object"}`: any JSON object."""
        return cls.from_schema({"type": "object"}, "json_object")

    def constraint(self, vocab: TokenVocabulary, budget: int) -> JsonConstraint:
        return JsonConstraint(self, vocab, budget)


class JsonConstraint:
    """One answer under a `JsonFormat`: `mask(logits)` before each sample, `consume(token)` after it."""

    def __init__(self, fmt: JsonFormat, vocab: TokenVocabulary, budget: int):
        llg = _llguidance()
        self.vocab, self.left = vocab, budget
        self.matcher = llg.LLMatcher(vocab.tokenizer, fmt.grammar, log_level=0)
        if self.matcher.is_error():
            raise InputError(f"the response format cannot be used: {self.matcher.get_error()[:500]}")
        self.fill = llg.numpy.fill_next_token_bitmask
        self.bits = llg.numpy.allocate_token_bitmask(1, vocab.outside.shape[0])
        self.string = (False, False)  # (inside a string, after a backslash) at the end of the answer so far
        self.tried: set[int] = set()  # tokens of the current string so far (the closing plan's novelty rule)
        self.closing = False
        # the plan from the start: a schema no value satisfies (no first token, or no end) or whose shortest
        # answer the plan finds is longer than the budget is refused here, before the answer takes a place
        self.plan_len, self.since_check = self._measure(), 0
        if self.plan_len > MAX_PLAN:
            raise InputError(f"the response format accepts no JSON value this model can write in {MAX_PLAN} tokens "
                             "(a schema nothing satisfies, or only very long values)")
        if self.plan_len > budget:
            raise InputError(f"the response format's shortest answer takes {self.plan_len} tokens, more than the "
                             f"{budget} allowed (max_tokens)")

    def _allowed(self, matcher) -> np.ndarray:
        """bool [V]: the tokens the grammar allows next."""
        self.fill(matcher, self.bits)
        bits = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: self.vocab.outside.shape[0]]
        return bits.astype(bool)

    def _closer(self, allowed: np.ndarray, string: tuple[bool, bool], tried: set[int] | None = None) -> int:
        """The closing plan's choice among the allowed tokens (eos once the JSON is complete). Inside a string
        whose pattern or format does not allow the quote yet (an e-mail needs its `@` and a domain), tokens
        the plan has not tried in this string come first, single punctuation characters before the rest: the plan
        walks through what the pattern allows instead of repeating the best-ranked token forever."""
        if allowed[self.vocab.eos_id]:
            return self.vocab.eos_id
        rank = self.vocab.inside if string[0] else self.vocab.outside
        if string[0] and not (allowed & (self.vocab.inside >= 3)).any():  # no quote allowed yet
            fresh = allowed.copy()
            fresh[list(tried or ())] = False
            for first in (fresh & self.vocab.punct, fresh):  # untried punctuation, then anything untried
                if first.any():
                    allowed = first
                    break
        return int(np.argmax(np.where(allowed, rank, -np.inf)))

    def _measure(self) -> int:
        """Tokens the closing plan needs from here (MAX_PLAN + 1 when it does not finish within MAX_PLAN)."""
        sim, string, tried = self.matcher.deep_copy(), self.string, self.tried
        for n in range(MAX_PLAN + 1):
            if sim.is_stopped():
                return n
            t = self._closer(self._allowed(sim), string, tried)
            if t == self.vocab.eos_id:
                return n + 1
            if not sim.consume_token(t):
                return MAX_PLAN + 1
            was_inside, string = string[0], string_state(*string, self.vocab.texts[t])
            tried = tried | {t} if was_inside and string[0] else set()
        return MAX_PLAN + 1

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """logits [1, V] -> the same with every token the grammar (or the closing plan) excludes at -inf."""
        allowed = self._allowed(self.matcher)
        hopeless = self.plan_len > MAX_PLAN  # never re-simulated: too costly
        if not self.closing and not hopeless and self.since_check >= CHECK_EVERY:
            self.plan_len, self.since_check = self._measure(), 0
            # the plan may grow before the next measurement: close with NEAR x its length (+ slack) left
            self.closing = self.plan_len <= MAX_PLAN and self.left <= NEAR * self.plan_len + 2 * CHECK_EVERY
        self.since_check += 1
        if self.closing:
            only = np.zeros_like(allowed)
            only[self._closer(allowed, self.string, self.tried)] = True
            allowed = only
        out = np.array(logits, dtype=np.float32, copy=True)
        out[:, ~allowed] = -np.inf
        return out

    def consume(self, token: int) -> None:
        self.left -= 1
        was_inside, self.string = self.string[0], string_state(*self.string, self.vocab.texts[int(token)])
        self.tried = self.tried | {int(token)} if was_inside and self.string[0] else set()
        if not self.matcher.consume_token(int(token)):
            raise InputError(f"constrained decoding: token {int(token)} was not allowed "
                             f"({self.matcher.get_error()[:200]})")

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()
