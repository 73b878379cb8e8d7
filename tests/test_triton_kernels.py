"""The Triton kernels (vl2edge.kernels) against dequantize-then-matmul references on fresh random inputs.

On a machine without CUDA they run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
before anything imports triton; set here too for a direct run of this file). The references use
`quant.format.dequantize` and plain float32 torch matmuls, independently of the kernels' code. Under the
interpreter, tests with full-size shapes pass bigger tiles than the GPU defaults (only to be faster there;
the default tiles are covered on the small shapes).

Dimension legend: T tokens, A top-k slots, D hidden, I expert intermediate, E experts, M rows,
N out features, K in features.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

import torch.nn.functional as F

from vl2edge.kernels import moe as moe_mod
from vl2edge.kernels.dequant import interpreting
from vl2edge.kernels.linear import qlinear
from vl2edge.kernels.moe import ExpertWeights, moe_experts
from vl2edge.quant.format import QuantSpec, dequantize
from vl2edge.quant.modules import quantize_tensor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tiles that are not the defaults: big under the interpreter (fewer interpreted ops), GPU-legal on a GPU.
# Both have BLOCK_K > the quant block for bs < 256, covering the per-column scale gather.
WIDE = {"block_n": 256, "block_k": 256} if interpreting() else {"block_n": 16, "block_k": 256}
SHAPES = {"tiny": (1280, 896, 6), "small": (2048, 1408, 6), "base": (2560, 1536, 8)}  # D, I, A
SPECS = [QuantSpec(bits, bs, sym) for bits in (4, 8) for bs in (32, 64, 128) for sym in (True, False)]


def _spec_id(s):
    return "float" if s is None else f"q{s.bits}b{s.block_size}{'s' if s.symmetric else 'z'}"


def _rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def _experts(gen, spec, E, D, I, dtype=torch.float32):
    """(gate, up, down) ExpertWeights on DEVICE and their float32 [E, N, K] CPU references."""
    out, refs = [], []
    for N, K in ((I, D), (I, D), (D, I)):
        w = _rand(gen, E, N, K, scale=K ** -0.5)
        if spec is None:
            w = w.to(dtype)
            out.append(ExpertWeights(weight=w.to(DEVICE)))
            refs.append(w.float())
            continue
        p = quantize_tensor(w, spec)
        out.append(ExpertWeights.from_packed({k: v.to(DEVICE) for k, v in p.items()}))
        z = p.get("qzeros")
        refs.append(torch.stack([dequantize(spec, p["qweight"][e], p["scales"][e], None if z is None else z[e])
                                 for e in range(E)]))
    return out, refs


def _ref_moe(x, idx, tw, refs):
    """sum_a tw[t, a] * down(silu(gate(x)) * up(x)) in float32, one (token, slot) pair at a time."""
    gate, up, down = refs
    xf = x.float().cpu()
    y = torch.zeros(x.shape[0], down.shape[1])
    for t, ids in enumerate(idx.cpu()):
        for a, e in enumerate(ids):
            h = F.silu(gate[e] @ xf[t]) * (up[e] @ xf[t])
            y[t] += tw[t, a].cpu() * (down[e] @ h)
    return y


def _inputs(gen, T, A, D, E, dtype):
    x = _rand(gen, T, D).to(dtype)
    idx = torch.randint(0, E, (T, A), generator=gen)
    tw = torch.rand(T, A, generator=gen)
    return x.to(DEVICE), idx.to(DEVICE), tw.to(DEVICE)


def _check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = ((y.float().cpu() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_moe_packed_variants(spec):
    """Every bit width, block size, with/without zero points: T=1 fp32 on the default tiles, T=3 bf16 wide."""
    gen = torch.Generator().manual_seed(10 + SPECS.index(spec))
    E, D, I, A = 8, 256, 128, 6
    experts, refs = _experts(gen, spec, E, D, I)
    for T, dtype, blocks in ((1, torch.float32, {}), (3, torch.bfloat16, WIDE)):
        x, idx, tw = _inputs(gen, T, A, D, E, dtype)
        _check(moe_experts(x, idx, tw, *experts, spec, **blocks), _ref_moe(x, idx, tw, refs), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 3], ids=["T1", "T3"])
def test_moe_float_experts(dtype, T):
    gen = torch.Generator().manual_seed(20 + T)
    E, D, I, A = 8, 192, 96, 6  # not multiples of the float tiles: masked columns and rows
    experts, refs = _experts(gen, None, E, D, I, dtype)
    x, idx, tw = _inputs(gen, T, A, D, E, dtype)
    _check(moe_experts(x, idx, tw, *experts, None), _ref_moe(x, idx, tw, refs), dtype)


@pytest.mark.parametrize(("shape", "spec"), [("tiny", QuantSpec(4, 64, False)), ("small", QuantSpec(4, 128, False)),
                                             ("base", QuantSpec(8, 128, True))], ids=["tiny", "small", "base"])
def test_moe_full_width_shapes(shape, spec):
    """The real D and I of each model size (fewer experts; ids repeat), T=1, the model's A."""
    gen = torch.Generator().manual_seed(30 + len(shape))
    D, I, A = SHAPES[shape]
    E = 4
    experts, refs = _experts(gen, spec, E, D, I)
    x, idx, tw = _inputs(gen, 1, A, D, E, torch.float32)
    blocks = {"block_n": 1024, "block_k": 128} if interpreting() else {}
    _check(moe_experts(x, idx, tw, *experts, spec, **blocks), _ref_moe(x, idx, tw, refs), torch.float32)


def test_moe_full_width_bf16_float_experts():
    gen = torch.Generator().manual_seed(40)
    D, I, A = SHAPES["tiny"]
    E = 3
    experts, refs = _experts(gen, None, E, D, I, torch.bfloat16)
    x, idx, tw = _inputs(gen, 1, A, D, E, torch.bfloat16)
    blocks = {"block_n": 512, "block_k": 256} if interpreting() else {}
    _check(moe_experts(x, idx, tw, *experts, None, **blocks), _ref_moe(x, idx, tw, refs), torch.bfloat16)


def _blob_views(t):
    """t [E, ...] as views into padded per-expert blobs: strided along E, dense within (the offload layout)."""
    n = t[0].numel()
    blobs = torch.zeros(t.shape[0], n + 48, dtype=t.dtype, device=t.device)
    blobs[:, :n] = t.reshape(t.shape[0], n)
    view = blobs[:, :n].view(t.shape)
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, False), None], ids=_spec_id)
def test_moe_rows_remap_matches_unpermuted(spec):
    """Stacks permuted into 'device slots' (strided blob views) + a rows table pointing at them == the
    unpermuted stacks."""
    gen = torch.Generator().manual_seed(50)
    E, D, I, A, T = 8, 128, 64, 6, 3
    experts, _ = _experts(gen, spec, E, D, I)
    x, idx, tw = _inputs(gen, T, A, D, E, torch.float32)
    perm = torch.randperm(E, generator=gen)  # slot s holds expert perm[s]
    rows = torch.argsort(perm).to(torch.int32).to(DEVICE)  # expert e lives in slot rows[e]
    slots = [ExpertWeights(**{f: None if v is None else _blob_views(v[perm.to(v.device)])
                              for f, v in vars(w).items()}) for w in experts]
    want = moe_experts(x, idx, tw, *experts, spec, **WIDE)
    assert torch.equal(moe_experts(x, idx, tw, *slots, spec, rows=rows, **WIDE), want)
    assert torch.equal(moe_experts(x, idx, tw, *slots, spec, rows=rows.long(), **WIDE), want)
    assert not torch.equal(moe_experts(x, idx, tw, *slots, spec, **WIDE), want)  # the table is what makes it right


def test_moe_repeated_expert_ids():
    gen = torch.Generator().manual_seed(60)
    spec = QuantSpec(8, 32, False)
    E, D, I, A = 4, 128, 64, 6
    experts, refs = _experts(gen, spec, E, D, I)
    x, _, tw = _inputs(gen, 2, A, D, E, torch.float32)
    idx = torch.tensor([[2, 2, 2, 1, 2, 1], [3, 3, 3, 3, 3, 3]], device=DEVICE)
    _check(moe_experts(x, idx, tw, *experts, spec), _ref_moe(x, idx, tw, refs), torch.float32)
    # the same expert in every slot == that expert once, weighted by the slots' total
    one = moe_experts(x[1:], idx[1:, :1].contiguous(), tw[1:].sum(1, keepdim=True), *experts, spec)
    torch.testing.assert_close(moe_experts(x[1:], idx[1:], tw[1:], *experts, spec), one, rtol=1e-5, atol=1e-6)


class _Launch:
    """Stands in for a jitted kernel: launches it with the host-sync guard lifted (the interpreter may
    read tensors itself), counting launches."""

    def __init__(self, kernel, guard):
        self.kernel, self.guard, self.calls = kernel, guard, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls += 1
            self.guard["on"] = False
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.guard["on"] = True
        return launch


def test_moe_wrapper_never_reads_device_values(monkeypatch):
    """Every Tensor method that copies values to the host raises while the wrapper's own code runs."""
    guard = {"on": False}

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            to_host = name != "to" or any(isinstance(a, (str, torch.device)) for a in args) or "device" in kwargs
            if guard["on"] and to_host:
                raise AssertionError(f"host synchronization: Tensor.{name}")
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, method)

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "to"):
        forbid(name)
    launches = [_Launch(moe_mod._gate_up_kernel, guard), _Launch(moe_mod._down_kernel, guard)]
    monkeypatch.setattr(moe_mod, "_gate_up_kernel", launches[0])
    monkeypatch.setattr(moe_mod, "_down_kernel", launches[1])

    gen = torch.Generator().manual_seed(70)
    spec = QuantSpec(4, 64, True)
    E, D, I, A, T = 8, 128, 64, 6, 3
    experts, refs = _experts(gen, spec, E, D, I)
    x, idx, tw = _inputs(gen, T, A, D, E, torch.float32)
    rows = torch.arange(E, device=DEVICE)
    guard["on"] = True
    with pytest.raises(AssertionError, match="host synchronization"):
        idx.tolist()  # the guard is live: a wrapper reading the ids would fail here
    y = moe_experts(x, idx, tw, *experts, spec, rows=rows)
    guard["on"] = False
    assert [k.calls for k in launches] == [1, 1]
    _check(y, _ref_moe(x, idx, tw, refs), torch.float32)


def test_moe_rejects_inconsistent_weights():
    gen = torch.Generator().manual_seed(80)
    spec = QuantSpec(4, 32, True)
    (gate, up, down), _ = _experts(gen, spec, 2, 64, 32)
    x, idx, tw = _inputs(gen, 1, 2, 64, 2, torch.float32)
    with pytest.raises(ValueError, match="qzeros"):
        moe_experts(x, idx, tw, gate, up, down, QuantSpec(4, 32, False))
    with pytest.raises(ValueError):
        moe_experts(x, idx, tw, gate, down, up, spec)  # up/down swapped: [E, D, I] where [E, I, D] is due
    with pytest.raises(ValueError, match="exactly one"):
        ExpertWeights()


QLINEAR_CASES = [(1, QuantSpec(4, 32, True)), (5, QuantSpec(4, 128, False)), (1, QuantSpec(8, 64, False)),
                 (5, QuantSpec(8, 32, True))]


@pytest.mark.parametrize(("M", "spec"), QLINEAR_CASES, ids=[f"M{m}-{_spec_id(s)}" for m, s in QLINEAR_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qlinear(M, spec, dtype):
    """N = 100 is no multiple of any tile's N; default tiles."""
    gen = torch.Generator().manual_seed(90 + M + spec.bits + spec.block_size)
    N, K = 100, 256
    p = quantize_tensor(_rand(gen, N, K, scale=K ** -0.5), spec)
    z = p.get("qzeros")
    x = _rand(gen, M, K).to(dtype)
    y = qlinear(x.to(DEVICE), p["qweight"].to(DEVICE), p["scales"].to(DEVICE),
                None if z is None else z.to(DEVICE), spec)
    _check(y, x.float() @ dequantize(spec, p["qweight"], p["scales"], z).T, dtype)


def test_qlinear_wide_tiles_many_rows_and_leading_dims():
    """M = 2 x 9 = 18 rows (two row tiles), a full-width K, non-default tiles."""
    gen = torch.Generator().manual_seed(100)
    spec = QuantSpec(4, 64, False)
    N, K = 300, 2560
    p = quantize_tensor(_rand(gen, N, K, scale=K ** -0.5), spec)
    x = _rand(gen, 2, 9, K)
    blocks = {"block_n": 128, "block_k": 128} if interpreting() else {"block_n": 16, "block_k": 16}
    y = qlinear(x.to(DEVICE), *(p[k].to(DEVICE) for k in ("qweight", "scales", "qzeros")), spec, **blocks)
    assert y.shape == (2, 9, N)
    ref = x.reshape(-1, K) @ dequantize(spec, p["qweight"], p["scales"], p["qzeros"]).T
    _check(y.reshape(-1, N), ref, torch.float32)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, False), QuantSpec(8, 64, True), None], ids=_spec_id)
@pytest.mark.parametrize("n_slots", [3, 0])
def test_offloaded_layer_reads_slots_and_the_store_in_place(spec, n_slots):
    """An offloaded layer's real slot table, slot buffer and store blobs (pinned on CUDA): residents come
    from their slots, the rest from the store, and the answer is the resident layer's."""
    from vl2edge.models.experts import DenseExperts
    from vl2edge.models.offload import ExpertStore, OffloadedExperts
    from vl2edge.quant.modules import QuantExperts

    gen = torch.Generator().manual_seed(7 + n_slots)
    E, D, I, T, A = 8, 128, 64, 2, 3
    dense = DenseExperts(E, D, I)
    for p in dense.parameters():
        p.copy_(_rand(gen, *p.shape, scale=0.1))
    layer = dense if spec is None else QuantExperts.from_dense(dense, spec)
    off = OffloadedExperts(ExpertStore(layer), n_slots, DEVICE)
    for e in (5, 2, 6)[:n_slots]:
        off.acquire(e, keep={e})
    x, _, tw = _inputs(gen, T, A, D, E, torch.float32)
    idx = torch.tensor([[5, 1, 2], [0, 6, 5]])  # residents and not, mixed within a token
    from vl2edge.kernels.moe import moe_offloaded

    y = moe_offloaded(x.to(DEVICE), idx.to(DEVICE), tw.to(DEVICE), off.table, off.layout.stacked_views(off.slots),
                      off.layout.stacked_views(off.store.blobs), spec)
    ref = layer(x.cpu(), idx, tw.cpu())  # the resident layer stays on the CPU; _inputs are on DEVICE
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-6)


def test_a_tile_wider_than_the_matrix_reads_nothing_past_it():
    """block_k wider than the down projection's K (= I): the columns past K must be masked. The stacks lie in
    buffers followed by NaN, so a read past a matrix shows up in the output (it did, as NaN, now and then)."""
    spec = QuantSpec(4, 32, False)
    gen = torch.Generator().manual_seed(3)
    E, D, I, A, T = 4, 128, 64, 2, 3
    experts, refs = _experts(gen, spec, E, D, I)

    def guarded(t: torch.Tensor) -> torch.Tensor:
        """t, in a buffer whose tail past it holds NaN (or 0xFF bytes): the same values, poison after them."""
        buf = torch.empty(t.numel() * 2, dtype=t.dtype, device=t.device)
        buf.fill_(float("nan") if t.dtype.is_floating_point else 255)
        buf[:t.numel()] = t.reshape(-1)
        return buf[:t.numel()].view(t.shape)

    poisoned = [ExpertWeights(qweight=guarded(w.qweight), scales=guarded(w.scales),
                              qzeros=None if w.qzeros is None else guarded(w.qzeros)) for w in experts]
    x, idx, tw = _inputs(gen, T, A, D, E, torch.float32)
    y = moe_experts(x, idx, tw, *poisoned, spec, block_n=16, block_k=128)
    assert torch.isfinite(y).all()
    _check(y, _ref_moe(x, idx, tw, refs), torch.float32)
