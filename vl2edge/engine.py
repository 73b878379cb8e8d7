"""Continuous batching: one decode step serves every running answer; new ones join between steps.

`Engine(decoder, max_batch, max_len)` owns a slot cache of `max_batch` rows (`generate.SlotDecoder`: the
PyTorch model or the ONNX Runtime one) and a worker thread. `submit(embeds, sequence)` returns a `Ticket`;
iterating it yields the answer's token ids as they are chosen. Each turn of the loop:

1. answers that were cancelled (or whose reader stopped reading) leave;
2. one chunk of the oldest waiting prompt is prefilled into the next free row, so running answers keep
   flowing while a long prompt enters chunk by chunk; when its last chunk is in, it chooses its first token
   and runs with the others;
3. one decode step feeds every running row its last token, each at its own position, and each row chooses
   its next token with its own sampling parameters, seed, penalties and grammar (`generate.Sequence`).

A row leaves the moment its answer ends, and the last row moves into its place: rows stay dense, so a step
runs over rows 0..R-1 and nothing else. Memory is the slots' (`max_batch` x `max_len` positions at most; the
PyTorch model allocates them once, the ONNX one as the longest row needs them, see `OnnxSlots`). A prompt is
embedded (its images through the vision tower) by the engine's thread when its turn to join comes, so the
vision tower and the decode steps take turns on the cores instead of fighting over them.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .errors import InputError
from .generate import DEFAULT_CHUNK, Sequence, SlotDecoder
from .prefix_cache import Hit

_END = object()


class Ticket:
    """One answer in the engine: iterate for its token ids (a failure of its embedding or of its step is raised
    here)."""

    def __init__(self, embed: Callable[[int], Any], length: int, sequence: Sequence, chunk_size: int,
                 cancelled: Callable[[], bool] | None, lookup: Callable[[], Hit | None] | None = None,
                 on_prefilled: Callable[[Any], None] | None = None):
        self.embed, self.sequence, self.chunk_size, self.length = embed, sequence, chunk_size, length
        self.lookup, self.on_prefilled = lookup, on_prefilled
        self.start = 0                  # positions restored from a stored prefix, not prefilled
        self.embeds: Any = None         # positions start..length-1
        self.prefilled = 0              # prompt positions in the cache so far
        self.last: int | None = None    # the token chosen last (fed at the next step)
        self._cancel, self._asked = threading.Event(), cancelled
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()

    def cancel(self) -> None:
        """Stop this answer before the engine's next step (any thread)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set() or (self._asked is not None and self._asked())

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._tokens.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _emit(self, token: int) -> None:
        self.last = token
        self._tokens.put(token)

    def _end(self, error: BaseException | None = None) -> None:
        if error is not None:
            self._tokens.put(error)
        self._tokens.put(_END)


class Engine:
    def __init__(self, decoder: Any, max_batch: int, max_len: int, chunk_size: int = DEFAULT_CHUNK):
        if not isinstance(decoder, SlotDecoder):
            raise InputError(f"the {type(decoder).__name__} backend cannot batch answers; use --max-batch 1")
        if max_batch < 1 or max_len < 2:
            raise InputError(f"--max-batch must be at least 1 (got {max_batch})")
        self.decoder, self.max_batch, self.max_len, self.chunk_size = decoder, max_batch, max_len, chunk_size
        self.cache = decoder.new_slots(max_batch, max_len)
        self.running: list[Ticket] = []                      # row i of the cache is running[i]
        self.joining: Ticket | None = None                   # being prefilled, in row len(running)
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.steps = 0                                       # decode steps run
        self.rows_decoded = 0                                # rows they served (mean batch = rows/steps)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, embed: Callable[[int], Any], length: int, sequence: Sequence, chunk_size: int | None = None,
               cancelled: Callable[[], bool] | None = None, lookup: Callable[[], Hit | None] | None = None,
               on_prefilled: Callable[[Any], None] | None = None) -> Ticket:
        """Queue an answer: `embed(start)` gives its prompt's embeddings from position `start` on, [1, length -
        start, D] (the backend's type; called by the engine when the answer joins), `sequence` its sampling
        state. `lookup()` (vl2edge/prefix_cache.py), asked when the answer joins, so that it finds what the
        answers before it stored: a stored prefix whose positions seed the row; `on_prefilled(saved)` receives
        a copy of the row's prompt positions once they are all in."""
        if length + sequence.max_new_tokens > self.max_len:
            raise InputError(f"the prompt ({length} tokens) and max_new_tokens ({sequence.max_new_tokens}) need "
                             f"{length + sequence.max_new_tokens} positions; a batch slot holds {self.max_len}")
        ticket = Ticket(embed, length, sequence, chunk_size or self.chunk_size, cancelled, lookup, on_prefilled)
        with self._wake:
            if self._closed:
                raise InputError("the engine is closed")
            self.waiting.append(ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vl2edge-engine", daemon=True)
                self._thread.start()
            self._wake.notify()
        return ticket

    def close(self) -> None:
        """Stop the worker after its current turn; answers still waiting end with an error."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        for t in [*self.running, *([self.joining] if self.joining else []), *self.waiting]:
            t._end(InputError("the engine was closed"))

    # -- the loop -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self.waiting or self.running or self.joining):
                    self._wake.wait()
                if self._closed:
                    return
            try:
                self.turn()
            except Exception as e:  # a failed step fails the answers in it; the engine goes on
                self._fail_all(e)

    def turn(self) -> None:
        """One turn: drop cancelled answers, prefill a chunk of a joining prompt, run one decode step."""
        for i in reversed(range(len(self.running))):
            if self.running[i].cancelled:
                self._leave(i)
        with self._wake:
            for t in [t for t in self.waiting if t.cancelled]:
                self.waiting.remove(t)
                t._end()
            if self.joining is None and self.waiting and len(self.running) < self.max_batch:
                self.joining = self.waiting.popleft()
                self.decoder.clear_row(self.cache, len(self.running))
        if self.joining is not None:
            self._prefill_chunk(self.joining)
        if self.running:
            self._decode_step()

    def _prefill_chunk(self, t: Ticket) -> None:
        row = len(self.running)
        if t.cancelled:
            self.joining = None
            self.decoder.clear_row(self.cache, row)
            t._end()
            return
        try:
            if t.embeds is None:
                hit = t.lookup() if t.lookup is not None else None
                t.start = hit.length if hit is not None else 0
                t.embeds = t.embed(t.start)
                if int(t.embeds.shape[1]) != t.length - t.start:
                    raise ValueError(f"embed() gave {t.embeds.shape[1]} positions, {t.length - t.start} were "
                                     "announced")
                if hit is not None:
                    self.cache.restore_row(row, hit.saved, t.start)
                t.prefilled = t.start
            end = min(t.prefilled + t.chunk_size, t.length)
            logits = self.decoder.prefill_row(t.embeds[:, t.prefilled - t.start:end - t.start], self.cache, row)
            if end == t.length and t.on_prefilled is not None:
                t.on_prefilled(self.cache.save_row(row, t.length))
        except Exception as e:  # a bad image, a broken prompt: this answer fails, the running ones go on
            self.joining = None
            self.decoder.clear_row(self.cache, row)
            t._end(e)
            return
        t.prefilled = end
        if end < t.length:
            return
        self.joining = None
        error = self._choose(t, logits)
        if error is not None or t.sequence.finished:
            self.decoder.clear_row(self.cache, row)
            t._end(error)
        else:
            self.running.append(t)

    @staticmethod
    def _choose(t: Ticket, logits) -> Exception | None:
        """Row `t` chooses its next token from its logits [1, V]; what goes wrong (its grammar refusing every
        token, a sampling parameter) is that row's failure, returned for it to end with, not the batch's."""
        try:
            t._emit(t.sequence.next(logits))
        except Exception as e:
            return e
        return None

    def _decode_step(self) -> None:
        tokens = np.array([t.last for t in self.running], dtype=np.int64)
        logits = self.decoder.decode_rows(tokens, self.cache)
        self.steps += 1
        self.rows_decoded += len(tokens)
        failed = {i: e for i, t in enumerate(self.running) if (e := self._choose(t, logits[i:i + 1])) is not None}
        for i in reversed(range(len(self.running))):
            if i in failed or self.running[i].sequence.finished:
                self._leave(i, failed.get(i))

    def _leave(self, i: int, error: Exception | None = None) -> None:
        """Row i's answer ends (with `error` when it failed): the last running row moves into its place, a
        joining prompt follows it down."""
        last = len(self.running) - 1
        ticket = self.running[i]
        if i != last:
            self.decoder.move_row(self.cache, last, i)
            self.running[i] = self.running[last]
        else:
            self.decoder.clear_row(self.cache, i)
        self.running.pop()
        if self.joining is not None:
            self.decoder.move_row(self.cache, last + 1, last)
        ticket._end(error)

    def _fail_all(self, error: Exception) -> None:
        failed = [*self.running, *([self.joining] if self.joining is not None else [])]
        self.running, self.joining = [], None
        for row in range(self.max_batch):
            self.decoder.clear_row(self.cache, row)
        for t in failed:
            t._end(error)
