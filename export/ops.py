"""How the torch model's modules become ONNX Runtime ops (the translation table of the export).

`prepare(module, ...)` swaps (through `vl2edge.models.swap.swap_modules`), in place and for export
only, each module for a twin with the same weights whose forward traces to the op ORT runs fastest:

    QLinear, 8-bit     -> int8 per-output-channel weights, activations quantized per token at run time,
                          MatMulInteger u8s8 (the matrix-unit path: AMX on recent Xeons; with its per-token
                          chain ~3x MatMulNBits on a 1432-token prefill, as fast at one token; RESULTS.md)
    QLinear, 4-bit     -> com.microsoft MatMulNBits (accuracy_level 4 by default: int8 activations)
    MoE (packed)       -> com.microsoft QMoE over the active experts, routing equal to DeepSeek's via
                          `router_weights` (softmax without renormalisation; noaux_tc: sigmoid, bias for
                          selection only, renormalised x routed_scaling_factor)
    MoE (float, or dims QMoE cannot take) -> a loop over the experts with NonZero/Gather/ScatterElements
                          (plain ops; exactly the active experts' FLOPs, any sequence length)
    RMSNorm            -> SimplifiedLayerNormalization
    MHAttention (Tiny) -> one fused q|k|v projection + com.microsoft GroupQueryAttention (RoPE inside,
                          rotate_half layout, BNSH cache; batches without left padding)
    MLP                -> one fused gate|up projection, Split, SiLU, down projection
    MLAttention        -> the reference's absorbed form for every length (one graph serves prefill and
                          decode)

Each custom op is an `autograd.Function` whose eager forward is the reference computation (so the
trace has the right shapes) and whose `symbolic` emits the contrib op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.onnx import symbolic_helper

from vl2edge.config import LanguageConfig
from vl2edge.models.experts import DenseExperts
from vl2edge.models.language import MLP, MHAttention, MLAttention, MoE, RMSNorm, apply_rope, rope_cos_sin
from vl2edge.models.swap import swap_modules
from vl2edge.quant.format import QuantSpec, dequantize
from vl2edge.quant.modules import QLinear, QuantExperts

MS = "com.microsoft::"


@dataclass(frozen=True)
class Kernels:
    """Which ORT kernels the twins trace to: MatMulNBits/QMoE `accuracy_level` (4: int8 activations allowed,
    0: the graph computes what the torch model does), and whether 8-bit linears take the MatMulInteger path
    when int8 activations are allowed (False: MatMulNBits, as graphs exported before 2026-12)."""

    accuracy_level: int = 4
    int8_matmul: bool = True


def _none(g):
    return symbolic_helper._optional_input_placeholder_tensor(g)


def _shape_only(x: torch.Tensor, n: int) -> torch.Tensor | None:
    """While tracing, a contrib op's twin needs to give the tracer only its output's shape ([..., n]):
    zeros instead of the product, so the export never holds a dequantized matrix (Tiny's lm_head as
    float32 is 662 MB) nor spends the time. None outside tracing (the twin computes)."""
    return x.new_zeros(*x.shape[:-1], n) if torch.jit.is_tracing() else None


class MatMulNBitsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, scales, qzeros, K: int, N: int, bits: int, block_size: int, acc: int):
        if (traced := _shape_only(x, N)) is not None:
            return traced
        spec = QuantSpec(bits, block_size, qzeros is None)
        return x @ dequantize(spec, qweight, scales, qzeros, K=K).T

    @staticmethod
    def symbolic(g, x, qweight, scales, qzeros, K, N, bits, block_size, acc):
        inputs = [x, qweight, scales] + ([] if symbolic_helper._is_none(qzeros) else [qzeros])
        out = g.op(MS + "MatMulNBits", *inputs, K_i=K, N_i=N, bits_i=bits, block_size_i=block_size,
                   accuracy_level_i=acc)
        sizes = symbolic_helper._get_tensor_sizes(x)
        if sizes is not None:
            out.setType(x.type().with_sizes([*sizes[:-1], N]))
        return out


class Int8LinearFn(torch.autograd.Function):
    """y = x @ W.T for W = wq * ws[:, None] (int8 [N, K], one scale per output row), x quantized per token.

    Per-token (not per-tensor) activation scales keep one outlier token of a long prefill from costing
    every other token its resolution; zero point 128 keeps the activations unsigned (u8s8 is the fast
    QGEMM on x86; s8s8 without AVX-VNNI-INT8 is not). Rows: x [..., K] is flattened to [M, K].
    """

    @staticmethod
    def forward(ctx, x, wq_t, ws, eps: float):
        if (traced := _shape_only(x, wq_t.shape[1])) is not None:
            return traced
        s = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=eps)
        q = torch.round(x / s).clamp(-128, 127)
        return (q @ wq_t.float()) * s * ws

    @staticmethod
    def symbolic(g, x, wq_t, ws, eps):
        K = symbolic_helper._get_tensor_sizes(wq_t)[0]
        const = lambda v, dtype: g.op("Constant", value_t=torch.tensor(v, dtype=dtype))  # noqa: E731
        lead = g.op("Slice", g.op("Shape", x), const([0], torch.int64), const([-1], torch.int64))
        rows = g.op("Reshape", x, const([-1, K], torch.int64))                          # [M, K]
        scale = g.op("Max", g.op("Mul", g.op("ReduceMax", g.op("Abs", rows), axes_i=[-1], keepdims_i=1),
                                 const(1 / 127, torch.float32)), const(eps, torch.float32))  # [M, 1]
        flat = g.op("Squeeze", scale, const([-1], torch.int64))                         # [M]
        zero = g.op("ConstantOfShape", g.op("Shape", flat), value_t=torch.tensor([128], dtype=torch.uint8))
        q = g.op("QuantizeLinear", rows, flat, zero, axis_i=0)                           # u8 [M, K]
        acc = g.op("MatMulInteger", q, wq_t, const(128, torch.uint8))                    # i32 [M, N]
        y = g.op("Mul", g.op("Mul", g.op("Cast", acc, to_i=1), scale), ws)              # f32 [M, N]
        return g.op("Reshape", y, g.op("Concat", lead, const([-1], torch.int64), axis_i=0))


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (int8 [K, N] (MatMulInteger's B layout), scale [N]): symmetric per row."""
    w = weight.detach().float()
    scale = (w.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).T.contiguous(), scale


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    @staticmethod
    def symbolic(g, x, weight, eps):
        out = g.op("SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)
        out.setType(x.type())
        return out


class QMoEFn(torch.autograd.Function):
    """QMoE over [T, D] tokens; selects top-k of `choice`, mixes with `weights` (renormalised if asked)."""

    @staticmethod
    def forward(ctx, x, choice, weights, fc1, fc1_s, fc1_z, fc2, fc2_s, fc2_z, k: int, normalize: int, bits: int,
                block_size: int, acc: int, inter: int):
        if (traced := _shape_only(x, x.shape[-1])) is not None:
            return traced
        idx = torch.topk(choice, k, dim=-1)[1]
        w = weights.gather(1, idx)
        if normalize:
            w = w / w.sum(-1, keepdim=True)
        sym = fc1_z is None
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j, e in enumerate(idx[t].tolist()):
                w1 = dequantize(QuantSpec(bits, block_size, sym), fc1[e].view(fc1.shape[1], -1, block_size * bits // 8),
                                fc1_s[e], None if sym else fc1_z[e], K=x.shape[1])
                h = x[t] @ w1.T
                h = F.silu(h[0::2]) * h[1::2]
                w2 = dequantize(QuantSpec(bits, block_size, sym), fc2[e].view(fc2.shape[1], -1, block_size * bits // 8),
                                fc2_s[e], None if sym else fc2_z[e], K=inter)
                out[t] += w[t, j] * (h @ w2.T)
        return out

    @staticmethod
    def symbolic(g, x, choice, weights, fc1, fc1_s, fc1_z, fc2, fc2_s, fc2_z, k, normalize, bits, block_size, acc,
                 inter):
        n = _none(g)
        z1 = n if symbolic_helper._is_none(fc1_z) else fc1_z
        z2 = n if symbolic_helper._is_none(fc2_z) else fc2_z
        out = g.op(MS + "QMoE", x, choice, fc1, fc1_s, n, fc2, fc2_s, n, n, n, n, z1, z2, n, weights, k_i=k,
                   activation_type_s="swiglu", swiglu_fusion_i=1, activation_alpha_f=1.0, activation_beta_f=0.0,
                   normalize_routing_weights_i=normalize, expert_weight_bits_i=bits, block_size_i=block_size,
                   accuracy_level_i=acc)
        out.setType(x.type())
        return out


class GQAFn(torch.autograd.Function):
    """GroupQueryAttention over packed q|k|v [B, T, (H+2KV)*hd] with past/present BNSH caches."""

    @staticmethod
    def forward(ctx, qkv, past_k, past_v, seqlens_k, total, cos, sin, H: int, KV: int, hd: int, theta: float):
        B, T, _ = qkv.shape
        q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
        q, k, v = (t.reshape(B, T, n, hd).transpose(1, 2) for t, n in ((q, H), (k, KV), (v, KV)))
        P = past_k.shape[2]
        c, s = rope_cos_sin(torch.arange(P, P + T, device=qkv.device)[None].expand(B, T), hd, theta, qkv.dtype)
        q, k = apply_rope(q, c, s), apply_rope(k, c, s)
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        mask = torch.arange(P + T)[None, :] <= torch.arange(P, P + T)[:, None]
        rk, rv = (t.repeat_interleave(H // KV, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, rk, rv, attn_mask=mask)
        return out.transpose(1, 2).reshape(B, T, H * hd), k, v

    @staticmethod
    def symbolic(g, qkv, past_k, past_v, seqlens_k, total, cos, sin, H, KV, hd, theta):
        n = _none(g)
        out, pk, pv = g.op(MS + "GroupQueryAttention", qkv, n, n, past_k, past_v, seqlens_k, total, cos, sin,
                           num_heads_i=H, kv_num_heads_i=KV, do_rotary_i=1, rotary_interleaved_i=0, outputs=3)
        out.setType(qkv.type().with_sizes([None, None, H * hd]))
        pk.setType(past_k.type())
        pv.setType(past_v.type())
        return out, pk, pv


# -- export twins of the runtime modules ------------------------------------------------------------------

class ExportLinear(nn.Module):
    """A QLinear's twin: 8-bit weights re-laid as int8 rows for MatMulInteger (when `kernels.int8_matmul`),
    other widths through MatMulNBits."""

    def __init__(self, q: QLinear, kernels: Kernels):
        super().__init__()
        self.q, self.acc = q, kernels.accuracy_level
        self.int8 = kernels.int8_matmul and kernels.accuracy_level == 4 and q.spec.bits == 8
        if self.int8:
            wq_t, ws = int8_rows(q.weight)
            self.register_buffer("wq_t", wq_t)
            self.register_buffer("ws", ws)
        # MLA reads kv_b_proj as a matrix: 4-bit weights unpack with a bitwise AND the tracer cannot export,
        # so the matrix is dequantized here, once, into a float constant (8-bit dequantizes in traceable ops)
        self.dense = q.weight.detach().clone() if q.needs_weight and q.spec.bits == 4 else None

    def forward(self, x):
        q = self.q
        if self.int8:
            y = Int8LinearFn.apply(x, self.wq_t, self.ws, 1e-12)
            return y if q.bias is None else y + q.bias
        p = q.packed()
        y = MatMulNBitsFn.apply(x, p["qweight"], p["scales"], p.get("qzeros"), q.in_features, q.out_features,
                                q.spec.bits, q.spec.block_size, self.acc)
        return y if q.bias is None else y + q.bias

    @property
    def weight(self):  # MLA reads kv_b_proj as a matrix
        return self.q.weight if self.dense is None else self.dense


def fused(mods: list[nn.Linear | QLinear], kernels: Kernels) -> nn.Module:
    """One projection computing several at once (outputs concatenated): packed rows or float rows stacked."""
    qs = [m for m in mods if isinstance(m, QLinear)]
    if len(qs) == len(mods) and len({m.spec for m in qs}) == 1:
        packed = {k: torch.cat([m.packed()[k] for m in qs]) for k in qs[0].packed()}
        bias = torch.cat([m.bias for m in qs if m.bias is not None]) if qs[0].bias is not None else None
        return ExportLinear(QLinear.from_packed(qs[0].spec, packed, qs[0].in_features, bias), kernels)
    lin = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=mods[0].bias is not None)
    lin.weight = nn.Parameter(torch.cat([m.weight for m in mods]), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(torch.cat([m.bias for m in mods]), requires_grad=False)
    return lin


def _twin(m: nn.Module, kernels: Kernels) -> nn.Module:
    return ExportLinear(m, kernels) if isinstance(m, QLinear) else m


class ExportMLP(nn.Module):
    def __init__(self, mlp: MLP, kernels: Kernels):
        super().__init__()
        self.inter = mlp.gate_proj.out_features
        self.gate_up, self.down_proj = fused([mlp.gate_proj, mlp.up_proj], kernels), \
            _twin(mlp.down_proj, kernels)

    def forward(self, x):
        g, u = self.gate_up(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(g) * u)


class ExportMLA(nn.Module):
    """MLA in the absorbed form for every length: one graph for prefill and decode."""

    def __init__(self, a: MLAttention):
        super().__init__()
        self.attn = a

    def forward(self, x, positions, mask, cache):
        return self.attn.attend(x, positions, mask, cache, expand=False)


class ExportMHA(nn.Module):
    def __init__(self, a: MHAttention, kernels: Kernels, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.layer, self.H, self.KV, self.hd, self.theta = a.layer, a.H, a.KV, a.hd, a.theta
        self.qkv = fused([a.q_proj, a.k_proj, a.v_proj], kernels)
        self.o_proj = _twin(a.o_proj, kernels)
        self.cos, self.sin = cos, sin

    def forward(self, x, positions, mask, cache):
        past_k, past_v = cache.past_kv(self.layer)
        out, k, v = GQAFn.apply(self.qkv(x), past_k, past_v, cache.seqlens_k, cache.total, self.cos, self.sin,
                                self.H, self.KV, self.hd, self.theta)
        cache.add_presents(k, v)
        return self.o_proj(out)


class ExportRMSNorm(nn.Module):
    def __init__(self, n: RMSNorm):
        super().__init__()
        self.weight, self.eps = n.weight, n.eps

    def forward(self, x):
        return RMSNormFn.apply(x, self.weight, self.eps)


def masked_experts(expert, n_experts: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Route [T, D] tokens through the experts with data-dependent shapes the exporters can trace."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(n_experts):
        hit = idx == e
        tok = hit.any(-1).nonzero().squeeze(-1)
        we = (w * hit).sum(-1)[tok]
        out = out.index_add(0, tok, expert(e, x[tok]).float() * we[:, None])
    return out.to(x.dtype)


def _qexpert(ex: QuantExperts, acc: int):
    def run(e, x):
        def lin(p, h, N, K):
            t = ex.stack(p).row(e)
            return MatMulNBitsFn.apply(h, t["qweight"], t["scales"], t.get("qzeros"), K, N, ex.spec.bits,
                                       ex.spec.block_size, acc)
        D, I = ex.hidden, ex.inter
        return lin("down_proj", F.silu(lin("gate_proj", x, I, D)) * lin("up_proj", x, I, D), D, I)
    return run


def qmoe_ok(ex) -> bool:
    """QMoE's CPU kernel needs hidden and intermediate sizes divisible by the block size."""
    return isinstance(ex, QuantExperts) and ex.hidden % ex.spec.block_size == 0 and \
        ex.inter % ex.spec.block_size == 0


class ExportMoE(nn.Module):
    def __init__(self, moe: MoE, kernels: Kernels):
        super().__init__()
        self.gate, self.experts, self.acc = moe.gate, moe.experts, kernels.accuracy_level
        self.shared_experts = None if moe.shared_experts is None else ExportMLP(moe.shared_experts, kernels)
        ex = self.experts
        if isinstance(ex, QuantExperts) and qmoe_ok(ex):
            # fc1 = gate and up rows interleaved [g0, u0, g1, u1, ...], as QMoE's SwiGLU wants
            g, u, d = (ex.stack(p).tensors() for p in ("gate_proj", "up_proj", "down_proj"))
            for name in d:
                self.register_buffer(f"fc1_{name}", torch.stack([g[name], u[name]], dim=2)
                                     .reshape(g[name].shape[0], 2 * g[name].shape[1], -1))
                self.register_buffer(f"fc2_{name}", d[name].reshape(d[name].shape[0], d[name].shape[1], -1))

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's top-k expert choice [B*T, A] for hidden states x [B, T, D] (exposed by tests' exports)."""
        k = self.gate.c.num_experts_per_tok
        assert k is not None  # LanguageConfig requires it with routed experts
        return torch.topk(self.gate.select_scores(x.reshape(-1, x.shape[-1]))[0], k, dim=-1)[1]

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        c, ex = self.gate.c, self.experts
        if qmoe_ok(ex):
            choice, scores = self.gate.select_scores(flat)
            norm = int(c.num_experts_per_tok > 1 and c.norm_topk_prob)
            weights = scores if norm else scores * c.routed_scaling_factor
            fc = dict(self.named_buffers(recurse=False))
            y = QMoEFn.apply(flat, choice, weights, fc["fc1_qweight"], fc["fc1_scales"], fc.get("fc1_qzeros"),
                             fc["fc2_qweight"], fc["fc2_scales"], fc.get("fc2_qzeros"), c.num_experts_per_tok,
                             norm, ex.spec.bits, ex.spec.block_size, self.acc, ex.inter)
            if norm and c.routed_scaling_factor != 1.0:
                y = y * c.routed_scaling_factor
        else:
            idx, w = self.gate(flat)
            run = _qexpert(ex, self.acc) if isinstance(ex, QuantExperts) else ex.expert
            y = masked_experts(run, ex.n_experts, flat, idx, w)
        y = y.view(B, T, D)
        return y + self.shared_experts(x) if self.shared_experts is not None else y


def _rope_tables(c: LanguageConfig):
    """cos/sin [max_position, head_dim/2] for GroupQueryAttention (fp32 frequencies, as the runtime)."""
    pos = torch.arange(c.max_position_embeddings)[None]
    cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, torch.float32)
    return cos[0, 0, :, : c.head_dim // 2].contiguous(), sin[0, 0, :, : c.head_dim // 2].contiguous()


def prepare(module: nn.Module, language: LanguageConfig, kernels: Kernels = Kernels(),
            plain: bool = False) -> nn.Module:
    """Swap every module below `module` (a model, or one part of it: a decoder layer, the final norm and
    head) for its export twin, in place; returns `module`. plain: standard ONNX ops only (no
    GroupQueryAttention / SimplifiedLayerNormalization), for the float32 verification export."""
    tables = None if plain or language.use_mla else _rope_tables(language)

    def twin(name: str, mod: nn.Module) -> nn.Module | None:
        if isinstance(mod, MHAttention) and tables is not None:
            return ExportMHA(mod, kernels, *tables)
        if isinstance(mod, MLAttention):
            swap_modules(mod, twin, name + ".")  # its projections and norms first
            return ExportMLA(mod)
        if isinstance(mod, MLP):
            return ExportMLP(mod, kernels)
        if isinstance(mod, QLinear):
            return ExportLinear(mod, kernels)
        if isinstance(mod, RMSNorm) and not plain:
            return ExportRMSNorm(mod)
        if isinstance(mod, MoE) and isinstance(mod.experts, (QuantExperts, DenseExperts)):
            return ExportMoE(mod, kernels)
        return None

    swap_modules(module, twin)
    return module
