"""The decoder's 8-bit linears on ONNX Runtime (export/ops.py: int8 rows, per-token activations,
MatMulInteger): the graph computes what its torch reference computes, and the per-token scales keep an
outlier row of a long prefill from costing the other rows their precision."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from vl2edge.cpu_features import u8s8_exact
from vl2edge.export.graphs import _export
from vl2edge.export.ops import ExportLinear, Kernels, int8_rows
from vl2edge.quant.format import QuantSpec
from vl2edge.quant.modules import QLinear


def _linear(K: int, N: int, bias: bool, seed: int) -> QLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(N, generator=g))
    return QLinear.from_linear(lin, QuantSpec(8, 32, True))


def _onnx(twin: nn.Module, x: torch.Tensor, tmp: Path):
    path = tmp / "lin.onnx"
    _export(twin, (x,), path, ["x"], ["y"], {"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}})
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"]), path


EXACT = pytest.mark.skipif(not u8s8_exact(), reason="this CPU's MatMulInteger u8s8 saturates (no VNNI): the export "
                           "keeps 8-bit linears on MatMulNBits here (tests/test_streaming_export.py checks that)")


@EXACT
@pytest.mark.parametrize("K,N,bias,seed", [(64, 96, False, 0), (128, 40, True, 1), (96, 256, False, 2)])
def test_graph_equals_its_reference_and_tracks_the_float_linear(K, N, bias, seed, tmp_path):
    q = _linear(K, N, bias, seed)
    twin = ExportLinear(q, Kernels())
    assert twin.int8
    sess, path = _onnx(twin, torch.randn(2, 3, K), tmp_path)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "MatMulInteger" in ops and "MatMulNBits" not in ops
    rng = np.random.default_rng(seed)
    for shape in ((1, 1, K), (2, 37, K), (1, 300, K)):  # decode, a batch, a long chunk: every axis dynamic
        x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.1, 10)
        got = sess.run(None, {"x": x})[0]
        with torch.no_grad():
            ref = twin(torch.from_numpy(x)).numpy()
            exact = (torch.from_numpy(x) @ q.weight.T + (q.bias if bias else 0)).numpy()
        assert got.shape == shape[:-1] + (N,)
        # same quantization on both sides; scales computed in a different order may move a rare x/s across a
        # rounding boundary: one level of one element
        assert np.abs(got - ref).max() <= 2e-3 * np.abs(ref).max()
        assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.02  # W8A8 against the 8-bit weights


@EXACT
def test_an_outlier_row_does_not_cost_the_others_their_precision(tmp_path):
    K, N = 128, 64
    q = _linear(K, N, False, 3)
    sess, _ = _onnx(ExportLinear(q, Kernels()), torch.randn(1, 2, K), tmp_path)
    x = np.random.default_rng(3).standard_normal((1, 50, K)).astype(np.float32)
    x[0, 7] *= 1000.0  # one token 1000x the others (as attention-sink tokens are in real models)
    got = sess.run(None, {"x": x})[0][0]
    exact = (torch.from_numpy(x[0]) @ q.weight.T).numpy()
    others = np.arange(50) != 7
    err = np.linalg.norm(got[others] - exact[others], axis=-1) / np.linalg.norm(exact[others], axis=-1)
    assert err.max() < 0.03  # per-tensor scales would leave these rows at ~1/8 of a level: error ~100 %
    assert np.linalg.norm(got[7] - exact[7]) / np.linalg.norm(exact[7]) < 0.03


def test_int8_rows_are_symmetric_per_row_and_keep_zero_rows():
    w = torch.randn(5, 32)
    w[2] = 0
    wq_t, scale = int8_rows(w)
    assert wq_t.dtype == torch.int8 and wq_t.shape == (32, 5) and scale.shape == (5,)
    assert int(wq_t.abs().max()) == 127 and torch.all(wq_t[:, 2] == 0)
    back = wq_t.T.float() * scale[:, None]
    assert torch.allclose(back, w, atol=float(scale.max()) / 2 + 1e-7)


def test_exact_graphs_and_4bit_linears_keep_matmulnbits():
    q8 = _linear(64, 32, False, 4)
    assert not ExportLinear(q8, Kernels(accuracy_level=0)).int8  # accuracy_level 0: the graph is the model
    assert not ExportLinear(q8, Kernels(int8_matmul=False)).int8
    lin = nn.Linear(64, 32, bias=False)
    assert not ExportLinear(QLinear.from_linear(lin, QuantSpec(4, 32, False)), Kernels()).int8


def test_the_export_block_size_follows_the_widths_qmoe_blocks():
    from vl2edge.quant.recipes import EXPORT_BLOCK_SIZE, export_block_size

    assert export_block_size(1280, 896) == EXPORT_BLOCK_SIZE == 64  # DeepSeek-VL2-Tiny
    assert export_block_size(2048, 1408) == 64                      # Small
    assert export_block_size(64, 32) == 32 and export_block_size(80, None) == 32
    assert export_block_size(2560, None) == 64
