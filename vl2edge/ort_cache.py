"""No warm-up tax: onnxruntime's session start-up work (graph optimization and, above all, weight
prepacking: ~3 s of the float vision graph's ~3-5 s start on full-size Tiny, bench/RESULTS.md) is done
once per graph and machine and cached; later sessions memory-map the result and start in a fraction.

    <cache>/optimized/<key>/graph.onnx(.data)    the optimized graph with its prepacked initializers

`<cache>` is the export cache's root (vl2edge/export_cache.py). `<key>` digests the graph file's sha256
from the export's manifest, the onnxruntime version and the CPU (model name and flags), because the
optimized graph may hold hardware-specific layouts (onnxruntime says so when it writes one). The entry
is written under a temporary name and renamed into place (vl2edge/outputs.py); an entry that fails to
load is rebuilt, and any failure to write one only costs the time it would have saved. CPU execution
provider only.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

from .errors import VL2Error

GRAPH = "graph.onnx"


def _cpu_identity() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    return f"{platform.machine()}|{model}|{flags}"


def entry_for(graph_sha256: str) -> Path:
    import onnxruntime as ort

    from .export_cache import cache_root

    key = hashlib.sha256(f"{graph_sha256}|{ort.__version__}|{_cpu_identity()}".encode()).hexdigest()[:20]
    return cache_root() / "optimized" / key


def cached_session(path: Path, graph_sha256: str | None, options: Any, providers: list[str]) -> Any:
    """An InferenceSession of `path`, from (or into) the optimized-graph cache when it can be."""
    import onnxruntime as ort

    if graph_sha256 is None or providers != ["CPUExecutionProvider"]:
        return ort.InferenceSession(str(path), options, providers=providers)
    entry = entry_for(graph_sha256)
    if (entry / GRAPH).is_file():
        fast = _copy_options(options)
        fast.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimized
        try:
            return ort.InferenceSession(str(entry / GRAPH), fast, providers=providers)
        except Exception:  # a damaged entry: rebuilt below
            pass
    try:
        return _build(path, entry, options, providers)
    except (OSError, VL2Error):  # an unwritable cache: run without it
        return ort.InferenceSession(str(path), options, providers=providers)


def _build(path: Path, entry: Path, options: Any, providers: list[str]) -> Any:
    import onnxruntime as ort

    from .outputs import OutputDir

    with OutputDir(entry, overwrite=True) as tmp:
        writer = _copy_options(options)
        writer.optimized_model_filepath = str(tmp / GRAPH)
        for key, value in (("session.optimized_model_external_initializers_file_name", GRAPH + ".data"),
                           ("session.optimized_model_external_initializers_min_size_in_bytes", "1024"),
                           ("session.save_external_prepacked_constant_initializers", "1")):
            writer.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(path), writer, providers=providers)
    return session


def _copy_options(options: Any) -> Any:
    import onnxruntime as ort

    out = ort.SessionOptions()
    out.intra_op_num_threads = options.intra_op_num_threads
    out.inter_op_num_threads = options.inter_op_num_threads
    out.graph_optimization_level = options.graph_optimization_level
    return out
