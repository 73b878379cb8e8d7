"""DeepSeekMoE language model in plain PyTorch: RMSNorm, MHA (Tiny) and MLA (Small/Base), MoE.

Matches the reference `deepseek_vl2/models/modeling_deepseek.py` (`DeepseekV2RMSNorm`,
`DeepseekV2Attention`, `DeepseekV2MoE`, `MoEGate`, `DeepseekV2DecoderLayer`): RMSNorm casts to the
activation dtype before the weight multiply; Tiny's transformers-4.38 `LlamaAttention` with NeoX
("rotate_half") RoPE; MLA with the de-interleaved RoPE and softmax scale (nope+rope)^-0.5; an fp32
router with softmax/greedy, group-limited and sigmoid/noaux_tc selection; shared experts added after
the routed sum. Module attribute names are the checkpoint's, so `language.model.layers.3.mlp.gate.weight`
is `self.model.layers[3].mlp.gate.weight`. The KV cache is passed in, never kept on modules.

Dimension legend: B batch, T new tokens, S cached + new positions, D hidden, H heads, E experts,
A experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vl2edge.config import LanguageConfig

from .cache import Cache
from .experts import DenseExperts, Experts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, T, dim] for NeoX-layout rotation (frequencies repeated across the two halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.int64).float() / dim))
    freqs = positions.float()[..., None] * inv_freq  # fp32, as the reference
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[x0, x1, x2, ...] -> [x0, x2, ..., x1, x3, ...]: MLA's RoPE works on pairs (2i, 2i+1)."""
    *lead, d = x.shape
    return x.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MHAttention(nn.Module):
    """Tiny's attention (use_mla false): plain multi-head attention, NeoX RoPE over the whole head."""

    def __init__(self, c: LanguageConfig, layer: int):
        super().__init__()
        assert c.num_key_value_heads is not None  # LanguageConfig fills it from num_attention_heads
        self.layer, self.H, self.KV, self.hd, self.theta = (layer, c.num_attention_heads, c.num_key_value_heads,
                                                             c.head_dim, c.rope_theta)
        b = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, self.H * self.hd, bias=b)
        self.k_proj = nn.Linear(c.hidden_size, self.KV * self.hd, bias=b)
        self.v_proj = nn.Linear(c.hidden_size, self.KV * self.hd, bias=b)
        self.o_proj = nn.Linear(self.H * self.hd, c.hidden_size, bias=b)

    def forward(self, x, positions, mask, cache: Cache) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.hd).transpose(1, 2)   # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.KV, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.KV, self.hd).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, self.hd, self.theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.write_kv(self.layer, k, v)
        if self.KV != self.H:
            k, v = (t.repeat_interleave(self.H // self.KV, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.hd))


class MLAttention(nn.Module):
    """Multi-head latent attention (Small/Base), with or without q-LoRA.

    The cache holds one latent per position: [kv_a_layernorm(ckv) (C), rope(k_pe) (R)]. Decode uses the
    absorbed form (queries multiplied into the latent space, as the reference); long prefills expand
    the latent into per-head keys and values instead, which is the same function at a third of the
    FLOPs.
    """

    EXPAND_MIN_T = 32  # new tokens from which a call expands the latent rather than absorbing

    def __init__(self, c: LanguageConfig, layer: int):
        super().__init__()
        assert c.kv_lora_rank is not None  # LanguageConfig requires it with MLA
        self.layer, self.H, self.theta = layer, c.num_attention_heads, c.rope_theta
        self.N, self.R, self.V, self.C = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        self.scale = (self.N + self.R) ** -0.5
        D, b = c.hidden_size, c.attention_bias
        self.q_lora_rank = c.q_lora_rank
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(D, self.H * (self.N + self.R), bias=False)
        else:
            self.q_a_proj = nn.Linear(D, c.q_lora_rank, bias=b)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.H * (self.N + self.R), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.C + self.R, bias=b)
        self.kv_a_layernorm = RMSNorm(self.C)
        self.kv_b_proj = nn.Linear(self.C, self.H * (self.N + self.V), bias=False)
        self.o_proj = nn.Linear(self.H * self.V, D, bias=b)

    def forward(self, x, positions, mask, cache: Cache) -> torch.Tensor:
        return self.attend(x, positions, mask, cache, expand=x.shape[1] >= self.EXPAND_MIN_T)

    def attend(self, x, positions, mask, cache: Cache, expand: bool) -> torch.Tensor:
        """expand: per-head keys/values from the latent (long chunks), else the absorbed form."""
        B, T, _ = x.shape
        H, N, R, V, C = self.H, self.N, self.R, self.V, self.C
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, N + R).transpose(1, 2)                      # [B, H, T, N+R]
        q_nope, q_pe = q.split([N, R], dim=-1)
        ckv, k_pe = self.kv_a_proj_with_mqa(x).split([C, R], dim=-1)    # [B, T, C], [B, T, R]
        cos, sin = rope_cos_sin(positions, R, self.theta, x.dtype)
        q_pe = apply_rope(deinterleave(q_pe), cos, sin)
        k_pe = apply_rope(deinterleave(k_pe)[:, None], cos, sin)[:, 0]
        latent = cache.write_latent(self.layer, torch.cat([self.kv_a_layernorm(ckv), k_pe], dim=-1))
        ckv_all, k_pe_all = latent[..., :C], latent[..., C:]          # [B, S, C], [B, S, R]
        kv_b = self.kv_b_proj.weight.to(latent.dtype)  # a quantized kv_b_proj dequantizes to float32
        w = kv_b.view(H, N + V, C)
        if expand:
            S = latent.shape[1]
            kv = F.linear(ckv_all, kv_b).view(B, S, H, N + V).transpose(1, 2)
            k_nope, v = kv.split([N, V], dim=-1)
            k = torch.cat([k_nope, k_pe_all[:, None].expand(B, H, S, R)], dim=-1)
            out = F.scaled_dot_product_attention(torch.cat([q_nope, q_pe], -1), k, v, attn_mask=mask,
                                                 scale=self.scale)
        else:
            q_abs = torch.matmul(q_nope, w[:, :N])                      # [B, H, T, C]
            k = latent[:, None].expand(B, H, *latent.shape[1:])         # [B, H, S, C+R], one shared head
            o = F.scaled_dot_product_attention(torch.cat([q_abs, q_pe], -1), k, k[..., :C], attn_mask=mask,
                                               scale=self.scale)       # [B, H, T, C]
            out = torch.matmul(o, w[:, N:].transpose(1, 2))             # [B, H, T, V]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * V))


class MoEGate(nn.Module):
    """The router, in float32. Returns (topk_idx [T, A], topk_w [T, A] float32)."""

    def __init__(self, c: LanguageConfig):
        super().__init__()
        assert c.n_routed_experts is not None  # only MoE layers have a gate
        self.c = c
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size), requires_grad=False)
        if c.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(c.n_routed_experts), requires_grad=False)

    def select_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(choice [T, E]: what top-k ranks, scores [T, E]: where the chosen experts' weights come from).

        softmax/greedy: both are the probabilities. Group-limited methods keep the best `topk_group`
        groups and set the other experts' choice to 0.0 (not -inf, exactly like the reference);
        noaux_tc ranks sigmoid + correction bias but weights with the unbiased sigmoid.
        """
        c = self.c
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if c.scoring_func == "softmax" else logits.sigmoid()
        if c.topk_method == "greedy":
            return scores, scores
        T, G = scores.shape[0], c.n_group
        assert G is not None and c.topk_group is not None  # LanguageConfig requires both for group-limited methods
        choice = scores if c.topk_method == "group_limited_greedy" else scores + self.e_score_correction_bias
        grouped = choice.view(T, G, -1)
        group_score = grouped.max(-1).values if c.topk_method == "group_limited_greedy" \
            else grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(c.topk_group, -1, sorted=False)[1], 1)
        return choice.masked_fill(~keep.bool().repeat_interleave(grouped.shape[-1], dim=1), 0.0), scores

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, k = self.c, self.c.num_experts_per_tok
        assert k is not None  # LanguageConfig requires it with routed experts
        choice, scores = self.select_scores(x)
        idx = torch.topk(choice, k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if k > 1 and c.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * c.routed_scaling_factor


class MoE(nn.Module):
    def __init__(self, c: LanguageConfig):
        super().__init__()
        self.gate = MoEGate(c)
        assert c.n_routed_experts is not None  # only MoE layers are built as MoE
        self.experts: Experts = DenseExperts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_experts = (MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts)
                               if c.n_shared_experts is not None else None)

    def forward(self, x: torch.Tensor, static: bool = False) -> torch.Tensor:
        """static: the sync-free expert path of the static decode step (`Experts.forward_static`)."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        idx, w = self.gate(flat)
        y = (self.experts.forward_static(flat, idx, w) if static else self.experts(flat, idx, w)).view(B, T, D)
        return y + self.shared_experts(x) if self.shared_experts is not None else y


class DecoderLayer(nn.Module):
    def __init__(self, c: LanguageConfig, i: int):
        super().__init__()
        self.self_attn = MLAttention(c, i) if c.use_mla else MHAttention(c, i)
        self.mlp = MoE(c) if c.is_moe_layer(i) else MLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h, positions, mask, cache, static: bool = False):
        h = h + self.self_attn(self.input_layernorm(h), positions, mask, cache)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x, static) if isinstance(self.mlp, MoE) else self.mlp(x))


class DeepseekModel(nn.Module):
    def __init__(self, c: LanguageConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LanguageModel(nn.Module):
    """`language.*` in the checkpoint: `model` (embeddings, layers, final norm) and `lm_head`."""

    def __init__(self, c: LanguageConfig):
        super().__init__()
        self.config = c
        self.model = DeepseekModel(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def forward(self, embeds: torch.Tensor, cache: Cache, attention_mask: torch.Tensor | None = None,
                last_only: bool = False, static: bool = False) -> torch.Tensor:
        """Run T new positions [B, T, D] through the layers, appending to `cache`; float32 logits
        [B, T, V] (or [B, V] for the last position with `last_only`). `static`: experts without host
        synchronisation (the static decode step)."""
        T = embeds.shape[1]
        positions, mask = cache.begin(attention_mask, T)
        h = embeds
        for layer in self.model.layers:
            h = layer(h, positions, mask, cache, static)
        cache.commit(T)
        h = self.model.norm(h[:, -1] if last_only else h)
        return self.lm_head(h).float()
