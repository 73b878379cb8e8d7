"""The ONNX Runtime backend: the decoder interface over an exported artifact directory, without torch.

`OnnxModel(dir)` implements what `generate.py` drives (`new_cache`, `prefill`, `decode`), the slot
interface of the continuous-batching engine (`new_slots`, `prefill_row`, `decode_rows`, `move_row`,
`clear_row`; rows at different positions, see `OnnxSlots`), and `embed` (token embeddings gathered from a
memory-mapped table, image features from the vision graph, laid out by `vl2edge.layout.image_layout`).
The tiles of a prompt go through the vision graph in chunks of VISION_BATCH tiles (sized for the cache:
measured by bench/vision_int8.py). The CUDA execution provider is used when `onnxruntime-gpu` is installed
and a GPU is visible; threads default to the number of physical cores. See export/build.py for the directory layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .artifact import read_manifest, verify_files
from .config import VL2Config
from .errors import CheckpointError, InputError
from .feature_cache import FeatureCache
from .layout import gather_rows, image_layout
from .ort_cache import cached_session

VISION_BATCH = 2  # tiles per vision-graph run: full-width int8 tower, 2 threads, s/tile at batch 1/2/4/10:
                  # 0.662/0.656/0.677/0.724 (float 2.64/2.66/2.62/2.93; bench/vision_int8.py)


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo; os.cpu_count() where that is unavailable."""
    try:
        pairs, phys = set(), None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                pairs.add((phys, line.split(":")[1].strip()))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def _version(v: str) -> tuple:
    return tuple(int(x) for x in v.split("+")[0].split(".")[:3] if x.isdigit())


class OnnxCache:
    """Past tensors between calls and the attention mask so far.

    Concatenating graphs (MLA, plain ops): `pasts` are the previous call's presents. GroupQueryAttention
    graphs: `pasts` are preallocated [B, KV, max_len, hd] buffers bound as both past and present, which
    the graph updates in place (no copy of the cache per token).
    """

    def __init__(self, pasts: dict[str, np.ndarray], batch: int, shared: bool, axis: int):
        self.pasts, self.mask, self.length, self.shared = pasts, np.zeros((batch, 0), np.int64), 0, shared
        self.axis = axis  # the sequence axis of every past tensor
        self.values = None
        if shared:
            import onnxruntime as ort

            self.values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in pasts.items()}  # the arrays' memory

    def _first(self, length: int) -> tuple:
        return (slice(0, 1),) + (slice(None),) * (self.axis - 1) + (slice(0, length),)

    def save(self, length: int) -> dict[str, np.ndarray]:
        """Copies of row 0's first `length` positions (vl2edge/prefix_cache.py)."""
        return {n: a[self._first(length)].copy() for n, a in self.pasts.items()}

    def restore(self, saved: dict[str, np.ndarray], length: int) -> None:
        """An empty one-row cache starts with the first `length` positions of `saved`."""
        if self.mask.shape != (1, 0):
            raise ValueError("a prefix is restored into an empty cache of one row")
        if self.shared:  # written into the buffers the graph updates in place
            for n, a in self.pasts.items():
                a[self._first(length)] = saved[n][self._first(length)]
        else:
            self.pasts = {n: np.ascontiguousarray(saved[n][self._first(length)]) for n in self.pasts}
        self.mask = np.ones((1, length), np.int64)
        self.length = length


CAPACITY_STEP = 256  # slot positions are allocated in multiples of this (OnnxSlots)


class OnnxSlots:
    """The engine's cache: per past tensor one buffer of `slots` rows x `capacity` positions, and each row's
    length. GroupQueryAttention graphs update the buffer in place: a call binds rows 0..R-1 (or one row) as past
    and present, with right-padded masks (a row's ones cover its own positions), so each row attends to, and
    writes at, its own length. Concatenating graphs (MLA, plain ops) get rows 0..R-1 cut to the longest row as
    past, with the gap between a row's length and the longest masked out (positions count the mask's ones, so
    the new token's position is the row's length); the new column goes back to each row's own position.

    `capacity` follows the longest row (a multiple of CAPACITY_STEP, at most `max_len`): it grows by half again
    when a row needs more, and shrinks when every row fits in a quarter of it. GroupQueryAttention's CPU kernel
    costs in proportion to the bound buffer's length, not the row's, so a one-row batch in a `max_len` buffer
    decoded at 0.7-0.9x the unbatched loop's speed on full-size Tiny (bench/RESULTS.md, 2026-12-07)."""

    def __init__(self, layout: dict, names: list[str], slots: int, max_len: int, step: int = CAPACITY_STEP):
        self.shared, self.axis, self.max_len = layout.get("shared_buffer", False), layout["sequence_axis"], max_len
        self.step = step  # capacity is a multiple of it
        shape = list(layout["shape"])
        shape[0], shape[self.axis] = slots, min(max_len, step)
        self.buffers = {n: np.zeros(shape, np.float32) for n in names}
        self.lengths = np.zeros(slots, np.int64)

    @property
    def capacity(self) -> int:
        """Positions a row can hold now (the buffers' length along the sequence axis)."""
        return next(iter(self.buffers.values())).shape[self.axis]

    def seq(self, rows: slice | np.ndarray, positions) -> tuple:
        """The index of `positions` (a slice or an index array) along the sequence axis, for `rows`."""
        return (rows,) + (slice(None),) * (self.axis - 1) + (positions,)

    def reserve(self, rows: slice, T: int) -> None:
        """Room for T more positions in `rows` (the buffers re-sized to the longest row); refuses a row that
        would outgrow `max_len`."""
        if (self.lengths[rows] + T > self.max_len).any():
            raise InputError(f"slot full: {int(self.lengths[rows].max()) + T} positions needed, "
                             f"{self.max_len} allocated")
        self._fit(max(int(self.lengths.max()), int(self.lengths[rows].max()) + T))

    def _fit(self, needed: int) -> None:
        """Capacity for `needed` positions a row: grown by half again (or to `needed`) when short, shrunk to
        twice `needed` when a quarter would do; the rows' positions are copied over."""
        step = self.step
        if needed > self.capacity:
            want = max(needed, self.capacity * 3 // 2)
        elif needed * 4 <= self.capacity and self.capacity > step:
            want = 2 * needed
        else:
            return
        want = min(self.max_len, max(step, -(-want // step) * step))
        keep = min(want, self.capacity)
        for name, old in self.buffers.items():
            shape = list(old.shape)
            shape[self.axis] = want
            new = np.zeros(shape, np.float32)
            new[self.seq(slice(None), slice(0, keep))] = old[self.seq(slice(None), slice(0, keep))]
            self.buffers[name] = new

    def save_row(self, row: int, length: int) -> dict[str, np.ndarray]:
        """Copies of row `row`'s first `length` positions (`OnnxCache.save`'s layout)."""
        return {n: b[self.seq(slice(row, row + 1), slice(0, length))].copy() for n, b in self.buffers.items()}

    def restore_row(self, row: int, saved: dict[str, np.ndarray], length: int) -> None:
        """Empty row `row` starts with the first `length` positions of `saved`."""
        self.lengths[row] = 0
        self.reserve(slice(row, row + 1), length)
        for n, b in self.buffers.items():
            b[self.seq(slice(row, row + 1), slice(0, length))] = saved[n][self.seq(slice(None), slice(0, length))]
        self.lengths[row] = length


class OnnxModel:
    def __init__(self, root, device: str = "auto", threads: int | None = None, vision: str | None = None,
                 cache_sessions: bool = True):
        import onnxruntime as ort

        self.root, self.cache_sessions = Path(root), cache_sessions
        self.features: FeatureCache | None = None  # use_feature_cache
        self.manifest = m = read_manifest(self.root)
        if _version(ort.__version__) < _version(m["min_onnxruntime"]):
            raise InputError(f"{self.root} needs onnxruntime >= {m['min_onnxruntime']} (installed: {ort.__version__}); "
                             f"pip install -U onnxruntime")
        self.config = VL2Config.from_pretrained(self.root)
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise InputError("--device cuda needs onnxruntime-gpu with a visible GPU "
                             "(pip uninstall onnxruntime && pip install onnxruntime-gpu)")
        self.providers = (["CUDAExecutionProvider"] if device != "cpu" and "CUDAExecutionProvider" in available
                          else []) + ["CPUExecutionProvider"]
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads = threads or physical_cores()
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.graphs = m["graphs"]
        self.decoder = self._session("decoder")
        self.vision_name = vision or m["default_vision"]
        if self.vision_name not in self.graphs:
            raise InputError(f"{self.root} has no {self.vision_name!r} graph (has: {', '.join(self.graphs)})")
        self._vision: dict = {}
        t = m["tensors"]
        try:
            self.embed_tokens = np.load(self.root / t["embed_tokens"], mmap_mode="r")
            self.image_newline = np.load(self.root / t["image_newline"])
            self.view_seperator = np.load(self.root / t["view_seperator"])
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.root}: cannot read the embedding tables: {e}") from None
        io = self.graphs["decoder"]
        self.past_names, self.present_names = io["past"], io["present"]
        self.cache_layout = io["cache"]

    def _session(self, name: str):

        path = self.root / self.graphs[name]["file"]
        if not path.is_file():
            raise CheckpointError(f"{self.root}: {path.name} is missing")
        # vision graphs start from the optimized-graph cache (their float weights' prepacking is most of
        # their start-up); for the decoder it measured ~15 % for 4 GB of disk, so it is not cached
        cached = self.cache_sessions and name.startswith("vision")
        digest = self.manifest.get("files", {}).get(path.name) if cached else None
        try:
            session = cached_session(path, digest, self.options, self.providers)
        except Exception as e:
            raise CheckpointError(f"{path} cannot be loaded by onnxruntime: {str(e).splitlines()[0]}") from None
        want = self.graphs[name]
        got_in, got_out = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        if got_in != want["inputs"] or not set(want["outputs"]) <= set(got_out):
            raise CheckpointError(f"{self.root}: the {name} graph in manifest.json is {path.name}, whose inputs "
                                  f"{got_in[:3]} and outputs {got_out[:3]} are not the {name} graph's "
                                  f"({want['inputs'][:3]}, {want['outputs'][:3]}): a damaged or edited manifest")
        return session

    def vision_session(self, name: str | None = None):
        name = name or self.vision_name
        if name not in self._vision:
            self._vision[name] = self._session(name)
        return self._vision[name]

    # -- embeddings -----------------------------------------------------------------------------------

    def use_feature_cache(self, budget: int) -> None:
        """Keep the tiles' features within `budget` bytes (vl2edge/feature_cache.py); 0: off."""
        self.features = FeatureCache(budget) if budget > 0 else None

    def encode_tiles(self, pixels: np.ndarray, batch: int = VISION_BATCH) -> np.ndarray:
        """pixels [n, 3, S, S] -> features [n, N', D], `batch` tiles per run of the vision graph (tiles seen
        before: from the feature cache)."""
        pixels = np.ascontiguousarray(pixels, np.float32)
        if self.features is None:
            return self._run_vision(pixels, batch)
        return self.features.encode([p.tobytes() for p in pixels], lambda i: self._run_vision(pixels[i], batch),
                                    np.stack)

    def _run_vision(self, pixels: np.ndarray, batch: int) -> np.ndarray:
        session = self.vision_session()
        return np.concatenate([session.run(None, {"pixel_values": pixels[i:i + batch]})[0]
                               for i in range(0, len(pixels), batch)])

    def embed(self, input_ids, images=None, images_seq_mask=None, images_spatial_crop=None) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.embed_tokens.shape[0]):
            raise InputError(f"token ids must be in [0, {self.embed_tokens.shape[0]})")
        embeds = np.asarray(self.embed_tokens[ids], dtype=np.float32)
        if images is None or images_spatial_crop is None or not np.asarray(images_spatial_crop).any():
            return embeds
        images, mask = np.asarray(images), np.asarray(images_seq_mask, dtype=bool)
        tiles, rows = image_layout(images_spatial_crop, self.config.tokens_per_side, self.config.global_view_pos,
                                   lambda b, t1, t2: np.array_equal(images[b, t1], images[b, t2]))
        feats = self.encode_tiles(np.stack([images[b, t] for b, t in tiles])).reshape(-1, embeds.shape[-1])
        table = np.concatenate([feats, self.image_newline[None], self.view_seperator[None]])
        for b, r in enumerate(rows):
            if int(mask[b].sum()) != len(r):
                raise InputError(f"row {b}: images_seq_mask marks {int(mask[b].sum())} positions but the images "
                                 f"give {len(r)} feature rows")
            embeds[b, mask[b]] = table[gather_rows(r, feats.shape[0])]
        return embeds

    # -- the decoder interface ------------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> OnnxCache:
        shared = self.cache_layout.get("shared_buffer", False)
        shape = list(self.cache_layout["shape"])
        shape[0], shape[self.cache_layout["sequence_axis"]] = batch, max_len if shared else 0
        return OnnxCache({n: np.zeros(shape, np.float32) for n in self.past_names}, batch, shared,
                         self.cache_layout["sequence_axis"])

    def _run(self, embeds: np.ndarray, cache: OnnxCache, mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask, dtype=np.int64)
        if cache.shared and not mask.all():
            raise InputError("this ONNX export (GroupQueryAttention) takes batches without padding")
        cache.mask = np.concatenate([cache.mask, mask], axis=1)
        embeds = np.ascontiguousarray(embeds, np.float32)
        if cache.shared:
            io = self.decoder.io_binding()
            io.bind_cpu_input("inputs_embeds", embeds)
            io.bind_cpu_input("attention_mask", cache.mask)
            io.bind_output("logits")
            assert cache.values is not None  # OnnxCache binds OrtValues when shared
            for past, present in zip(self.past_names, self.present_names):
                io.bind_ortvalue_input(past, cache.values[past])
                io.bind_ortvalue_output(present, cache.values[past])
            self.decoder.run_with_iobinding(io)
            logits = io.get_outputs()[0].numpy()
        else:
            out = self.decoder.run(None, {"inputs_embeds": embeds, "attention_mask": cache.mask, **cache.pasts})
            cache.pasts = dict(zip(self.past_names, out[1:1 + len(self.past_names)]))
            logits = out[0]
        cache.length = cache.mask.shape[1]
        return logits

    def prefill(self, embeds, cache: OnnxCache, attention_mask=None) -> np.ndarray:
        B, T = embeds.shape[:2]
        mask = np.ones((B, T), np.int64) if attention_mask is None else attention_mask
        return self._run(np.asarray(embeds), cache, mask)

    def decode(self, token_ids, cache: OnnxCache) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1, 1)
        return self._run(self.embed(ids), cache, np.ones_like(ids))

    # -- the slot interface (continuous batching) ------------------------------------------------------

    def new_slots(self, slots: int, max_len: int) -> OnnxSlots:
        return OnnxSlots(self.cache_layout, self.past_names, slots, max_len)

    def prefill_row(self, embeds, cache: OnnxSlots, row: int) -> np.ndarray:
        T, rows = np.asarray(embeds).shape[1], slice(row, row + 1)
        cache.reserve(rows, T)
        n = int(cache.lengths[row])
        logits, presents = self._run_rows(embeds, cache, rows, np.ones((1, n + T), np.int64))
        for name, present in presents.items():  # concatenating graphs: the chunk's columns into the row
            cache.buffers[name][cache.seq(rows, slice(n, n + T))] = present[cache.seq(slice(None), slice(n, n + T))]
        cache.lengths[row] += T
        return logits

    def decode_rows(self, token_ids, cache: OnnxSlots) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1, 1)
        R, rows = ids.shape[0], slice(0, ids.shape[0])
        cache.reserve(rows, 1)
        n = cache.lengths[:R]
        S = int(n.max()) + 1
        mask = (np.arange(S)[None] <= n[:, None]).astype(np.int64)   # [R, S]: each row's own positions + the new one
        if not cache.shared:
            mask[:, -1] = 1                                          # the new column sits after the longest row
            mask[np.arange(R), n] = n == S - 1
        logits, presents = self._run_rows(self.embed(ids), cache, rows, mask)
        for name, present in presents.items():
            cache.buffers[name][cache.seq(np.arange(R), n)] = present[cache.seq(np.arange(R), np.full(R, S - 1))]
        cache.lengths[:R] += 1
        return logits

    def _run_rows(self, embeds, cache: OnnxSlots, rows: slice, mask: np.ndarray) -> tuple[np.ndarray, dict]:
        """One decoder run over `rows` of the slot buffers: logits, and (concatenating graphs) the presents."""
        embeds = np.ascontiguousarray(embeds, np.float32)
        if cache.shared:
            io = self.decoder.io_binding()
            io.bind_cpu_input("inputs_embeds", embeds)
            io.bind_cpu_input("attention_mask", mask)
            io.bind_output("logits")
            import onnxruntime as ort

            for past, present in zip(self.past_names, self.present_names):
                view = ort.OrtValue.ortvalue_from_numpy(cache.buffers[past][rows])  # rows of the buffer, no copy
                io.bind_ortvalue_input(past, view)
                io.bind_ortvalue_output(present, view)
            self.decoder.run_with_iobinding(io)
            return io.get_outputs()[0].numpy(), {}
        past_len = mask.shape[1] - embeds.shape[1]
        feeds = {n: np.ascontiguousarray(cache.buffers[n][cache.seq(rows, slice(0, past_len))])
                 for n in self.past_names}
        out = self.decoder.run(None, {"inputs_embeds": embeds, "attention_mask": mask, **feeds})
        return out[0], dict(zip(self.past_names, out[1:1 + len(self.past_names)]))

    def move_row(self, cache: OnnxSlots, src: int, dst: int) -> None:
        n = int(cache.lengths[src])
        for buf in cache.buffers.values():
            buf[cache.seq(slice(dst, dst + 1), slice(0, n))] = buf[cache.seq(slice(src, src + 1), slice(0, n))]
        cache.lengths[dst], cache.lengths[src] = n, 0

    def clear_row(self, cache: OnnxSlots, row: int) -> None:
        cache.lengths[row] = 0

    def verify_files(self) -> list[str]:
        return verify_files(self.root)
