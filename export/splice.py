"""One ONNX graph spliced from traced pieces, its tensors streamed to the external-data file as they come.

The streaming export traces the decoder a piece at a time (the mask arithmetic, each layer, the head) and
hands each piece's ModelProto to `GraphWriter.add`: the piece's values are renamed into the whole graph's
namespace (its inputs and outputs wired to the names the caller gives, everything else prefixed; the
tracer's intermediate shapes are dropped: their symbolic sizes are named per piece, and two layers' would
clash), its
initializers are appended to `<file>.data` (a tensor whose content was written before is shared, e.g.
every layer's RoPE tables) and only their references stay in memory. `close()` drops nodes whose outputs
nothing reads and writes `<file>` (the graph without its weights: a few MB at Base's size).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

INLINE_MAX = 1024       # bytes: smaller tensors stay inside the graph file (as onnx.save_model's size_threshold)
ALIGN = 4096            # external tensors of a MiB or more start on page boundaries (onnxruntime may map them)
SMALL_ALIGN = 64


class GraphWriter:
    """The graph `out` under construction; `out.data` (its external data) is written as pieces arrive."""

    def __init__(self, out: Path, opsets: dict[str, int], ir_version: int = 8):
        self.out, self.opsets, self.ir_version = Path(out), opsets, ir_version
        self.data_name = self.out.name + ".data"
        self.data = open(self.out.with_name(self.data_name), "wb")
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: dict[str, onnx.ValueInfoProto] = {}
        self.outputs: dict[str, onnx.ValueInfoProto] = {}
        self._written: dict[bytes, str] = {}   # content digest -> initializer name

    def add(self, piece: onnx.ModelProto, prefix: str, wiring: dict[str, str],
            inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ()) -> None:
        """Append `piece`'s nodes. wiring: the piece's input/output names -> names in the whole graph (the
        others get `prefix`). inputs/outputs: piece names that become inputs/outputs of the whole graph."""
        g = piece.graph
        names = dict(wiring)
        for t in g.initializer:
            names[t.name] = self._initializer(t, prefix + t.name)

        def rename(n: str) -> str:
            return n if n == "" else names.get(n, prefix + n)

        for node in g.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise ValueError(f"{node.op_type} {node.name}: pieces with subgraphs are not spliced")
            value = _large_constant(node)
            if value is not None:  # a traced constant (e.g. each layer's RoPE tables): an initializer, shared
                value.name = node.output[0]
                names[node.output[0]] = self._initializer(value, prefix + node.output[0])
                continue
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.name = prefix + node.name
            new.input[:] = [rename(n) for n in node.input]
            new.output[:] = [rename(n) for n in node.output]
            self.nodes.append(new)
        for vi in g.input:
            if vi.name in inputs:
                self.inputs[rename(vi.name)] = _renamed(vi, rename(vi.name))
        for vi in g.output:
            if vi.name in outputs:
                self.outputs[rename(vi.name)] = _renamed(vi, rename(vi.name))

    def _initializer(self, t: onnx.TensorProto, name: str) -> str:
        """Write one tensor (or find its twin already written); returns its name in the whole graph."""
        raw = t.raw_data if t.HasField("raw_data") else np.ascontiguousarray(numpy_helper.to_array(t)).tobytes()
        key = hashlib.sha256(f"{t.data_type}:{list(t.dims)}:".encode() + raw).digest()
        if key in self._written:
            return self._written[key]
        new = onnx.TensorProto(name=name, data_type=t.data_type, dims=list(t.dims))
        if len(raw) < INLINE_MAX:
            new.raw_data = raw
        else:
            offset = -self.data.tell() % (ALIGN if len(raw) >= 2**20 else SMALL_ALIGN)
            self.data.write(b"\0" * offset)
            start = self.data.tell()
            self.data.write(raw)
            new.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", self.data_name), ("offset", str(start)), ("length", str(len(raw)))):
                entry = new.external_data.add()
                entry.key, entry.value = k, v
        self.initializers.append(new)
        self._written[key] = name
        return name

    def close(self, inputs: list[str], outputs: list[str]) -> int:
        """Write the graph with these inputs and outputs (in this order); returns the bytes of external data."""
        self.data.close()
        nodes = _live(self.nodes, set(outputs))
        used = {n for node in nodes for n in node.input}
        graph = onnx.helper.make_graph(
            nodes, self.out.stem, [self.inputs[n] for n in inputs], [self.outputs[n] for n in outputs],
            initializer=[t for t in self.initializers if t.name in used])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                             for d, v in self.opsets.items()],
                                       producer_name="vl2edge")
        model.ir_version = self.ir_version
        onnx.save_model(model, str(self.out))
        return self.out.with_name(self.data_name).stat().st_size


def _large_constant(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor of a Constant node holding at least INLINE_MAX bytes, else None."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for a in node.attribute:
        if a.name == "value" and a.t.ByteSize() >= INLINE_MAX:
            t = onnx.TensorProto()
            t.CopyFrom(a.t)
            return t
    return None


def _renamed(vi: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    new = onnx.ValueInfoProto()
    new.CopyFrom(vi)
    new.name = name
    return new


def _live(nodes: list[onnx.NodeProto], needed: set[str]) -> list[onnx.NodeProto]:
    """The nodes some graph output depends on, in their order (e.g. a mask form no layer kind reads)."""
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    return keep[::-1]
