"""`load()` -> Pipeline: processor + decoder backend + generation + text; what the CLI and server use.

    pipe = vl2edge.load("deepseek-ai/deepseek-vl2-tiny")          # or a local directory
    res = pipe.chat([{"role": "user", "content": "<image>\\nWhat is written here?"}], images=["sign.jpg"])
    res.text, res.token_ids, res.timings
    for piece in pipe.stream(messages, images): print(piece, end="")
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import api_args
from .config import VL2Config
from .engine import Engine
from .errors import InputError
from .generate import DEFAULT_CHUNK, Backend, Sequence, generate
from .grounding import parse as parse_grounding
from .placement import Plan
from .prefix_cache import Hit, PrefixCache, check_budget, default_budget, parse_budget, prompt_key
from .processor import Processor, check_compatible
from .quant.recipes import MANIFEST
from .sampling import SamplingParams, log_softmax
from .structured import JsonFormat, TokenVocabulary

FEATURE_SHARE_MAX = 256 << 20  # bytes of tile features (use_prefix_cache)


@dataclass
class Result:
    text: str
    token_ids: list[int]          # the new tokens only (an eos that ended the answer included)
    finish_reason: str            # "stop" (eos or a stop string), "length" or "cancelled"
    prompt_tokens: int
    timings: dict = field(default_factory=dict)
    image_sizes: list = field(default_factory=list)  # original (w, h) of each image
    boxes: list = field(default_factory=list)        # grounding.Box: <|det|> boxes in pixels of the last image
    grounding_problems: list = field(default_factory=list)
    logprobs: list | None = None                     # per token (OpenAI's shape) when asked for
    cached_tokens: int = 0                           # prompt positions restored from the prefix cache


class TextStream:
    """Incremental detokenization: text pieces as soon as they are whole characters."""

    def __init__(self, decode):
        self.decode, self.ids, self.prefix, self.read = decode, [], 0, 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


@dataclass(frozen=True)
class Options:
    """How one answer is generated (`Pipeline.generation`'s keywords, checked)."""

    max_new_tokens: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    chunk_size: int = DEFAULT_CHUNK
    stop: tuple[str, ...] = ()
    response_format: JsonFormat | None = None   # constrained decoding (vl2edge/structured.py)
    logprobs: int | None = None                 # None: off; k >= 0: each token's logprob and its top k


class Generation:
    """One answer in progress: iterate for text pieces; `.result` once exhausted. `cancel()` (any thread)
    stops it before the next decode step."""

    result: Result | None

    def __init__(self, pipe: Pipeline, messages, images, options: Options, inputs=None):
        self.pipe, self.result, self.inputs, self.options = pipe, None, inputs, options
        self.messages, self.images = messages, images
        self._cancel = threading.Event()
        self._logprobs: list[dict] = []
        self._logprobs_sent = 0
        self.cached_tokens = 0  # prompt positions the prefix cache gave (known once iteration starts)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[str]:
        o, pipe, t0 = self.options, self.pipe, time.perf_counter()
        inputs = self.inputs if self.inputs is not None else pipe.processor(self.messages, self.images)
        T, limit = inputs.input_ids.shape[1], pipe.context_length
        if limit <= T:
            raise InputError(f"the prompt is {T} tokens (images included) but the model's context is {limit}; "
                             "use fewer or smaller images or a shorter conversation")
        max_new = min(o.max_new_tokens, limit - T)
        constraint = None
        if o.response_format is not None:
            vocab = TokenVocabulary.of(pipe.processor, pipe.vocab_size)
            constraint = o.response_format.constraint(vocab, max_new)
        logprobs = self._logprobs
        observe = None if o.logprobs is None else (lambda x, tok: logprobs.append(self._logprob(x[0], int(tok[0]))))
        eos, rng, engine = pipe.processor.eos_id, np.random.default_rng(o.seed), pipe.engine

        times = {"embedded": t0}
        prefixes = pipe.prefix_cache
        key = None if prefixes is None else prompt_key(inputs)

        def lookup() -> Hit | None:  # here, or when the answer joins the batch (after those before it stored)
            if prefixes is None or key is None:
                return None
            hit = prefixes.match(key, max(T - 2, 0))  # two positions always prefilled: one runs other kernels
            self.cached_tokens = hit.length if hit is not None else 0
            return hit

        def embed(start: int):  # positions start..T-1; here, or in the engine's thread when the answer joins
            if not inputs.images_seq_mask[0, start:].any():  # no image after the cached prefix: no vision tower
                embeds = pipe.backend.embed(inputs.input_ids[:, start:])
            else:
                embeds = pipe.backend.embed(inputs.input_ids, inputs.images, inputs.images_seq_mask,
                                            inputs.images_spatial_crop)[:, start:]
            times["embedded"] = time.perf_counter()
            return embeds

        def store(saved) -> None:
            assert prefixes is not None and key is not None  # passed only with a prefix cache
            prefixes.store(key, saved)

        keep = None if prefixes is None else store
        if engine is not None:
            ticket = engine.submit(embed, T, Sequence(max_new_tokens=max_new, eos_id=eos, params=o.sampling, rng=rng,
                                                      prompt_ids=inputs.input_ids[0], constraint=constraint,
                                                      observe=observe),
                                   chunk_size=o.chunk_size, cancelled=self._cancel.is_set, lookup=lookup,
                                   on_prefilled=keep)
            tokens: Iterator[int] = iter(ticket)
        else:
            hit = lookup()
            tokens = (int(tok[0]) for tok in generate(
                pipe.backend, embed(self.cached_tokens), inputs.attention_mask, max_new_tokens=max_new, eos_id=eos,
                params=o.sampling, rng=rng, prompt_ids=inputs.input_ids, chunk_size=o.chunk_size,
                constraint=constraint, observe=observe, cancelled=self._cancel.is_set, prefix=hit,
                on_prefilled=keep))
        try:
            yield from self._text(tokens, eos, t0, times, inputs)
        finally:
            if engine is not None:
                ticket.cancel()  # a reader that stopped (a stop string, a closed stream) frees its row

    def _text(self, tokens: Iterator[int], eos: int | None, t0: float, times: dict, inputs) -> Iterator[str]:
        """Token ids -> text pieces, held back while a stop string may be forming; sets `result` at the end."""
        o, T = self.options, inputs.input_ids.shape[1]
        stream, ids, first = TextStream(self.pipe.processor.decode), [], None
        text, sent, stopped = "", 0, False
        hold = max((len(s) for s in o.stop), default=1) - 1  # a stop string may still be forming
        for t in tokens:
            first = first or time.perf_counter()
            ids.append(t)
            if t == eos:
                stopped = True
                break
            text += stream.push(t)
            cut = min((i for i in (text.find(s) for s in o.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, stopped = text[:cut], True
                break
            if len(text) - hold > sent:
                yield text[sent:len(text) - hold]
                sent = len(text) - hold
        if not stopped:
            text += stream.flush()
        if len(text) > sent:
            yield text[sent:]
        end = time.perf_counter()
        n = len(ids)
        g = parse_grounding(text, inputs.image_sizes[0])
        reason = "cancelled" if self.cancelled else "stop" if stopped else "length"
        self.result = Result(
            text=text, token_ids=ids, finish_reason=reason, prompt_tokens=T,
            image_sizes=inputs.image_sizes[0], boxes=g.boxes, grounding_problems=g.problems,
            logprobs=None if o.logprobs is None else self._logprobs[:len(ids)], cached_tokens=self.cached_tokens,
            timings={"embed_s": times["embedded"] - t0, "ttft_s": (first or end) - t0, "total_s": end - t0,
                     "new_tokens": n, "decode_tok_s": (n - 1) / (end - first) if first and n > 1 else None})

    def new_logprobs(self) -> list[dict]:
        """The logprobs entries of the tokens decoded since the last call (for streaming them)."""
        out = self._logprobs[self._logprobs_sent:]
        self._logprobs_sent = len(self._logprobs)
        return out

    def _logprob(self, x: np.ndarray, token: int) -> dict:
        """OpenAI's logprobs entry for the chosen token: its log-probability under the adjusted (and masked)
        logits at temperature 1, and the top `logprobs` alternatives."""
        lp = log_softmax(x[None])[0]
        decode = self.pipe.processor.decode

        def entry(t: int) -> dict:
            s = decode([t])
            return {"token": s, "logprob": float(max(lp[t], -9999.0)), "bytes": list(s.encode("utf-8"))}

        k = self.options.logprobs or 0
        top = np.argsort(-lp, kind="stable")[:k]
        return {**entry(token), "top_logprobs": [entry(int(t)) for t in top]}


class Pipeline:
    """A processor, a decoder backend (`VL2Model` or `OnnxModel`) and, when a GPU budget was planned,
    the device placement (`vl2edge.placement.Plan`)."""

    def __init__(self, processor: Processor, backend: Backend, context_length: int, plan: Plan | None = None):
        self.processor, self.backend, self.context_length, self.plan = processor, backend, context_length, plan
        self.engine: Engine | None = None
        self.prefix_cache: PrefixCache | None = None

    def use_prefix_cache(self, budget: int | str | None) -> None:
        """Keep what prompts cost to read within `budget` bytes ("2GiB"; None: `prefix_cache.default_budget()`;
        0: off): a quarter of it (at most FEATURE_SHARE_MAX) for the vision tower's tile features
        (vl2edge/feature_cache.py), the rest for prompts' KV positions, so that a later prompt starts from the
        longest stored prefix it shares (vl2edge/prefix_cache.py). A backend whose cache cannot save and
        restore positions keeps the prefixes off."""
        size = default_budget() if budget is None else budget if isinstance(budget, int) else parse_budget(budget)
        if isinstance(size, bool) or size < 0:
            raise InputError(f"prefix cache budget must be a size in bytes >= 0, got {budget!r}")
        features = min(check_budget(size) // 4, FEATURE_SHARE_MAX)
        use_features = getattr(self.backend, "use_feature_cache", None)
        if callable(use_features):
            use_features(features)
        else:
            features = 0
        probe = self.backend.new_cache(1, 1)
        able = callable(getattr(probe, "save", None)) and callable(getattr(probe, "restore", None))
        self.prefix_cache = PrefixCache(size - features) if size and able else None

    def start_batching(self, max_batch: int, max_len: int | None = None) -> None:
        """Answer through the continuous-batching engine (vl2edge/engine.py): up to `max_batch` answers share
        each decode step, from threads that each run a `Generation`. Its slots hold `max_len` positions (the
        model's context by default) and are allocated now. `max_batch` 1 keeps the single-answer loop."""
        api_args.integer(max_batch, "max_batch", 1, api_args.MAX_BATCH)
        api_args.integer(max_len, "max_len", 2, self.context_length, none=True)
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if max_batch > 1:
            self.engine = Engine(self.backend, max_batch, max_len or self.context_length)

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits."""
        return self.backend.config.language_config.vocab_size

    def generation(self, messages, images=None, *, max_new_tokens: int = 512, temperature: float = 0.0,
                   top_p: float = 1.0, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                   presence_penalty: float = 0.0, logit_bias: dict | None = None, seed: int | None = None,
                   chunk_size: int = DEFAULT_CHUNK, stop=None, response_format: JsonFormat | None = None,
                   logprobs: int | None = None, inputs=None) -> Generation:
        """An answer in progress (iterate for text pieces). `inputs`: the processor's output for these
        messages, when the caller has already computed it. `response_format`: JSON constrained decoding
        (`vl2edge.structured.JsonFormat`). `logprobs`: report each token's log-probability and its top k."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise InputError(f"seed must be an integer, got {seed!r}")
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                     or not 0 <= logprobs <= 20):
            raise InputError(f"logprobs (top alternatives) must be an integer in [0, 20], got {logprobs!r}")
        stops = api_args.stops(stop)
        images = api_args.images(images)
        response_format = api_args.response_format(response_format)
        api_args.integer(chunk_size, "chunk_size", 1, api_args.MAX_CHUNK)
        try:
            bias = tuple(sorted((int(k), float(v)) for k, v in (logit_bias or {}).items()))
        except (TypeError, ValueError, AttributeError):
            raise InputError("logit_bias must map token ids to numbers") from None
        sampling = SamplingParams(temperature, top_p, repetition_penalty, frequency_penalty, presence_penalty, bias)
        options = Options(max_new_tokens, sampling, None if seed is None else seed % 2**64, chunk_size,
                          tuple(s for s in stops if s),  # an empty stop string would end every answer at once
                          response_format, logprobs)
        return Generation(self, messages, images, options, inputs)

    def stream(self, messages, images=None, **kw) -> Iterator[str]:
        """Text pieces of the answer as they are decoded."""
        yield from self.generation(messages, images, **kw)

    def chat(self, messages, images=None, **kw) -> Result:
        """The whole answer. temperature=0 (the default) is greedy."""
        g = self.generation(messages, images, **kw)
        for _ in g:
            pass
        assert g.result is not None  # set when the iteration ends
        return g.result


BACKENDS = ("auto", "torch", "onnx")


def load(path_or_id, device: str = "auto", dtype: str = "auto", quant: str | None = None,
         threads: int | None = None, gpu_memory=None, backend: str | None = None,
         vision: str | None = None, graph: bool = True, force: bool = False,
         prefix_cache: int | str | None = None) -> Pipeline:
    """A ready pipeline for a model directory or Hugging Face id.

    An ONNX export (`vl2edge export`, has manifest.json) runs on ONNX Runtime without torch (`threads`
    defaults to the physical cores). A float checkpoint on a machine without a CUDA GPU runs, by default
    (`backend="auto"`), through an int4-experts ONNX export built once into a cache
    (vl2edge/export_cache.py); `backend="torch"` (or `VL2EDGE_BACKEND=torch`) runs the PyTorch model
    instead, and so does asking for what only it does: `quant=`, `gpu_memory=`, a `dtype`.
    `backend="onnx"` uses the cached export on any machine. A quantized directory (`vl2edge quantize`)
    loads as such on the PyTorch backend; `quant="int4-experts"` (or `int8`, `int4`) quantizes a float
    checkpoint while loading, without writing files. `gpu_memory` ("6GiB") plans the device placement
    and offloads the routed experts that do not fit (see `vl2edge.models.loading.load_model`). `vision`
    ("float" or "int8", ONNX backend): the vision graph to run instead of the export's default. On CUDA the
    PyTorch model decodes through the static decode step (`vl2edge.models.decode_step`), replayed as a CUDA
    graph; `graph=False` runs that step eagerly. Before the CPU default downloads or exports anything, it
    checks from config.json alone that the model fits this machine (vl2edge/fits.py); `force` skips that.
    `prefix_cache` ("2GiB", bytes, 0 = off; default `prefix_cache.default_budget()`): prompts' KV positions
    kept so that a later prompt sharing their beginning prefills only the rest (vl2edge/prefix_cache.py).
    """
    budget = None if prefix_cache is None else prefix_cache if isinstance(prefix_cache, int) \
        else check_budget(parse_budget(prefix_cache))  # refused before anything loads
    pipe = _build(path_or_id, device, dtype, quant, threads, gpu_memory, backend, vision, graph, force)
    pipe.use_prefix_cache(budget)
    return pipe


def _build(path_or_id, device: str, dtype: str, quant: str | None, threads: int | None, gpu_memory,
           backend: str | None, vision: str | None, graph: bool, force: bool) -> Pipeline:
    """`load` without its prefix cache."""
    from .artifact import is_onnx_dir
    from .hub import config_dir, resolve

    api_args.load_args(path_or_id, device, dtype, quant, threads, vision)
    asked = backend  # VL2EDGE_BACKEND is a default for checkpoints; an ONNX export always runs on ONNX Runtime
    backend = backend or os.environ.get("VL2EDGE_BACKEND") or "auto"
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    where = config_dir(path_or_id)  # a local directory, or a hub id's config.json alone (no weights yet)
    if is_onnx_dir(where):
        if quant is not None or asked == "torch":
            raise InputError(f"{where} is an ONNX export (its recipe was fixed when it was exported); "
                             "--quant and --backend torch need a checkpoint")
        return _onnx_pipeline(resolve(path_or_id), device, threads, vision)
    config = VL2Config.from_pretrained(where)  # config errors before anything heavy
    if backend == "onnx" or (backend == "auto" and _cpu_only(device) and quant is None and gpu_memory is None
                             and dtype in (None, "auto") and not (where / MANIFEST).is_file()):
        if quant is not None or gpu_memory is not None:
            raise InputError("--backend onnx runs the cached int4-experts export: --quant and --gpu-memory are "
                             "options of the PyTorch backend")
        from .export_cache import cache_root, cached_export, entry_for, verify_entry

        if not force:
            from .fits import check

            exported = where == Path(path_or_id).expanduser() and verify_entry(entry_for(where)) is None
            check(config, str(path_or_id), None if exported else cache_root())
        path = resolve(path_or_id)
        try:
            entry = cached_export(path)
        except ImportError as e:
            raise InputError(f"running a float checkpoint needs the PyTorch extras ({e.name} is missing): "
                             "pip install 'vl2edge[export]', or run an ONNX export directory") from None
        return _onnx_pipeline(entry, device, threads, vision)
    if vision is not None:
        raise InputError("--vision-graph chooses among an ONNX export's graphs; the PyTorch backend has one tower")
    path = resolve(path_or_id)
    try:
        from .models.loading import load_model
    except ImportError as e:
        raise InputError(f"the PyTorch backend needs torch ({e.name} is missing): pip install 'vl2edge[torch]'") \
            from None
    processor = _processor(path, config)
    model, plan = load_model(path, dtype=dtype, device=device, quant=quant, gpu_memory=gpu_memory)
    limit = model.config.language_config.max_position_embeddings
    if model.device.type == "cuda":
        from .models.decode_step import StaticDecoder

        if StaticDecoder.supports(model):
            return Pipeline(processor, StaticDecoder(model, graph=graph), limit, plan)
    return Pipeline(processor, model, limit, plan)


def _cpu_only(device: str) -> bool:
    if device == "cpu":
        return True
    if device not in (None, "auto"):
        return False
    if not _gpu_nodes():
        return True  # plainly no GPU: not worth importing torch (about a second) to ask
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


def _gpu_nodes() -> bool:
    """Whether this machine may have a CUDA GPU: on Linux, an NVIDIA driver or device node, or WSL's GPU device;
    elsewhere we cannot tell cheaply, so yes."""
    if not sys.platform.startswith("linux"):
        return True
    return (Path("/proc/driver/nvidia").exists() or Path("/dev/dxg").exists()
            or any(Path("/dev").glob("nvidia[0-9]*")))


def _onnx_pipeline(path, device: str, threads: int | None, vision: str | None = None) -> Pipeline:
    from .onnx_backend import OnnxModel

    if vision not in (None, "float", "int8"):
        raise InputError(f"vision must be float or int8, got {vision!r}")
    backend = OnnxModel(path, device=device, threads=threads,
                        vision=None if vision is None else {"float": "vision", "int8": "vision_int8"}[vision])
    return Pipeline(_processor(path, backend.config), backend, backend.config.language_config.max_position_embeddings)


def _processor(path, config: VL2Config) -> Processor:
    processor = Processor.from_pretrained(path)
    check_compatible(processor, config, str(path))
    return processor
