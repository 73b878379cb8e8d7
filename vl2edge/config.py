"""DeepSeek-VL2 configuration: one dataclass per sub-model, with the checkpoint's own field names.

`VL2Config.from_dict(config.json)` ignores unknown keys, fills absent ones with the reference defaults
(`DeepseekV2Config` in `deepseek_vl2/models/configuration_deepseek.py`; `VisionEncoderConfig`,
`MlpProjectorConfig` in `deepseek_vl2/models/modeling_deepseek_vl_v2.py`), and rejects values the
runtime does not implement with a message that names the key. `tensor_shapes()` lists every tensor an
official checkpoint of the config holds. Every size has an upper bound far above the released models,
checked before anything is sized from it. The presets are in `vl2edge.presets`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import schema
from .errors import ConfigError

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
TILE_TAGS = ("2D",)  # the reference's "1D" branch is abandoned and crashes (config.aligner)
GLOBAL_VIEW_POS = ("head", "tail")
PROJECTOR_TYPES = ("downsample_mlp_gelu",)

OFFICIAL_RESOLUTIONS = [
    [384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384],
    [768, 768], [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768],
    [384, 2688], [2688, 384], [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456],
    [3456, 384], [1152, 1152],
]


# Upper bounds far above every released model, checked before anything is sized from a config: a
# config with ten million layers must be an error, not gigabytes of allocations.
MAX_DIM = 1 << 17        # widths, intermediate sizes
MAX_COUNT = 1 << 12      # layers, heads, experts
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 20
MAX_IMAGE = 1 << 13      # pixels per side of a tile or a candidate resolution


def _check(ok: bool, where: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config {where} = {value!r} is not supported; expected {expected}")


def _bounded(obj, section: str, bounds: dict[str, int]) -> None:
    """Each named integer field in [1, bound]."""
    for k, hi in bounds.items():
        v = getattr(obj, k)
        _check(0 < v <= hi, f"{section}.{k}", v, f"an integer in [1, {hi}]")


def _positive_finite(obj, section: str, names: tuple[str, ...], hi: float = 1e12) -> None:
    for k in names:
        v = getattr(obj, k)
        _check(math.isfinite(v) and 0 < v <= hi, f"{section}.{k}", v, f"a positive finite number <= {hi:g}")


def _refuse_siblings(d: dict) -> None:
    """Checkpoints that share the `deepseek_vl_v2` model type but not the model: DeepSeek-OCR (and OCR-2)
    have a SAM + CLIP vision encoder, named in `architectures` or visible in vision_config (a `width` per
    encoder, a SAM or CLIP model_name). Refused by name before any field is read as a VL2 one."""
    archs = d.get("architectures")
    names = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    given = d.get("vision_config")
    vision: dict = given if isinstance(given, dict) else {}
    width, model_name = vision.get("width"), str(vision.get("model_name", ""))
    encoders = sorted(width) if isinstance(width, dict) else []
    if any("ocr" in a.lower() for a in names) or encoders or any(k in model_name.lower() for k in ("sam", "clip",
                                                                                                "deeplip")):
        what = next((a for a in names if "ocr" in a.lower()), None) or "a DeepSeek-OCR-style checkpoint"
        shown = f" ({', '.join(encoders)[:80]})" if encoders else (f" ({model_name[:40]})" if model_name else "")
        raise ConfigError(f"config.json describes {what}: its vision encoder{shown} is not DeepSeek-VL2's SigLIP "
                          "tower, although it shares the model_type 'deepseek_vl_v2'; vl2edge runs DeepSeek-VL2 "
                          "(Tiny, Small, Base) only")


def _typed(cls, section: str, d: dict):
    """Build dataclass `cls` from `d`: unknown keys ignored, known keys type-checked by annotation."""
    if not isinstance(d, dict):
        raise ConfigError(f"config {section} must be an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            kwargs[f.name] = _coerce(f"{section}.{f.name}" if section else f.name, d[f.name], hints[f.name])
    return cls(**kwargs)


def _coerce(where: str, value, typ):
    options = typing.get_args(typ) if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union \
        else (typ,)
    if value is None and type(None) in options:
        return None
    for t in options:
        base = typing.get_origin(t) or t
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool) and \
                math.isfinite(value):
            return float(value)
        if base in (str, list, dict) and isinstance(value, base):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise ConfigError(f"config {where} = {value!r} has the wrong type; expected {names}")


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP ViT tower (`vision_config`); defaults are `VisionEncoderConfig`'s."""

    model_name: str = "siglip_large_patch16_384"  # never read by the reference
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0

    def __post_init__(self):
        _bounded(self, "vision_config", {"image_size": MAX_IMAGE, "patch_size": MAX_IMAGE, "width": MAX_DIM,
                                         "layers": MAX_COUNT, "heads": MAX_COUNT})
        _positive_finite(self, "vision_config", ("mlp_ratio",), hi=64)
        _check(self.width % self.heads == 0, "vision_config.heads", self.heads, f"a divisor of width {self.width}")
        _check(self.patch_size <= self.image_size, "vision_config.patch_size", self.patch_size,
               f"at most image_size {self.image_size}")

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        """Patches per side: 384 // 14 = 27 (the last 6 pixel rows/columns are never seen)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ProjectorConfig:
    """2x2-merge MLP projector (`projector_config`); defaults are `MlpProjectorConfig`'s."""

    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False

    def __post_init__(self):
        _check(self.projector_type in PROJECTOR_TYPES, "projector_config.projector_type", self.projector_type,
               " or ".join(PROJECTOR_TYPES))
        _check(not self.token_pooling, "projector_config.token_pooling", self.token_pooling, "false")
        _bounded(self, "projector_config", {"input_dim": MAX_DIM, "n_embed": MAX_DIM, "depth": 64, "mlp_ratio": 64,
                                            "downsample_ratio": 16})

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of each Linear; they sit at `layers.0, layers.2, ...` with GELUs between."""
        r2, hid = self.downsample_ratio ** 2, self.n_embed * self.mlp_ratio
        mids = [(hid, hid)] * max(self.depth - 2, 0)
        return [(hid, self.input_dim * r2), *mids, (self.n_embed, hid)]


@dataclass(frozen=True)
class LanguageConfig:
    """DeepSeekMoE language model (`language_config`); defaults are `DeepseekV2Config`'s."""

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "greedy"  # the reference default is the typo "gready", which crashes its gate
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    use_mla: bool = True

    def __post_init__(self):
        lc = "language_config"
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        _bounded(self, lc, {"vocab_size": MAX_VOCAB, "hidden_size": MAX_DIM, "intermediate_size": MAX_DIM,
                            "num_hidden_layers": MAX_COUNT, "num_attention_heads": MAX_COUNT,
                            "num_key_value_heads": MAX_COUNT, "max_position_embeddings": MAX_CONTEXT,
                            "moe_layer_freq": MAX_COUNT, "moe_intermediate_size": MAX_DIM})
        _positive_finite(self, lc, ("rope_theta", "routed_scaling_factor"))
        _positive_finite(self, lc, ("rms_norm_eps",), hi=1.0)
        _check(0 <= self.first_k_dense_replace <= self.num_hidden_layers, f"{lc}.first_k_dense_replace",
               self.first_k_dense_replace, f"an integer in [0, num_hidden_layers ({self.num_hidden_layers})]")
        _check(self.topk_method in TOPK_METHODS, f"{lc}.topk_method", self.topk_method, " or ".join(TOPK_METHODS))
        _check(self.scoring_func in SCORING_FUNCS, f"{lc}.scoring_func", self.scoring_func,
               " or ".join(SCORING_FUNCS))
        _check(self.hidden_act == "silu", f"{lc}.hidden_act", self.hidden_act, "silu")
        _check(self.rope_scaling is None, f"{lc}.rope_scaling", self.rope_scaling,
               "null (every released DeepSeek-VL2 uses plain RoPE)")
        _check(not self.tie_word_embeddings, f"{lc}.tie_word_embeddings", self.tie_word_embeddings, "false")
        if self.use_mla:
            _check(self.kv_lora_rank is not None and 0 < self.kv_lora_rank <= MAX_DIM, f"{lc}.kv_lora_rank",
                   self.kv_lora_rank, f"an integer in [1, {MAX_DIM}] with MLA attention (use_mla true)")
            _bounded(self, lc, {"qk_rope_head_dim": MAX_DIM, "qk_nope_head_dim": MAX_DIM, "v_head_dim": MAX_DIM})
            _check(self.qk_rope_head_dim % 2 == 0, f"{lc}.qk_rope_head_dim", self.qk_rope_head_dim, "an even number")
            _check(self.q_lora_rank is None or 0 < self.q_lora_rank <= MAX_DIM, f"{lc}.q_lora_rank",
                   self.q_lora_rank, f"null or an integer in [1, {MAX_DIM}]")
        else:
            _check(self.hidden_size % self.num_attention_heads == 0, f"{lc}.num_attention_heads",
                   self.num_attention_heads, f"a divisor of hidden_size {self.hidden_size}")
            _check(self.head_dim % 2 == 0, f"{lc}.num_attention_heads", self.num_attention_heads,
                   "a value that gives an even head_dim")
            _check(self.num_attention_heads % self.num_key_value_heads == 0, f"{lc}.num_key_value_heads",
                   self.num_key_value_heads, f"a divisor of num_attention_heads {self.num_attention_heads}")
        if self.n_routed_experts is not None:
            _check(0 < self.n_routed_experts <= MAX_COUNT, f"{lc}.n_routed_experts", self.n_routed_experts,
                   f"an integer in [1, {MAX_COUNT}]")
            _check(self.n_shared_experts is None or 0 < self.n_shared_experts <= 64, f"{lc}.n_shared_experts",
                   self.n_shared_experts, "null or an integer in [1, 64]")
            k = self.num_experts_per_tok
            _check(k is not None and 0 < k <= self.n_routed_experts, f"{lc}.num_experts_per_tok", k,
                   f"an integer in 1..n_routed_experts ({self.n_routed_experts})")
            if self.topk_method != "greedy":
                g, tg = self.n_group, self.topk_group
                _check(g is not None and g > 0 and self.n_routed_experts % g == 0, f"{lc}.n_group", g,
                       f"a divisor of n_routed_experts ({self.n_routed_experts}) with {self.topk_method}")
                _check(tg is not None and 0 < tg <= g, f"{lc}.topk_group", tg, f"an integer in 1..n_group ({g})")
            if self.topk_method == "noaux_tc":
                _check(self.n_routed_experts // self.n_group >= 2, f"{lc}.n_group", self.n_group,
                       "groups of at least 2 experts (noaux_tc scores a group by its top-2)")
                _check(k <= self.topk_group * (self.n_routed_experts // self.n_group), f"{lc}.num_experts_per_tok",
                       k, "at most topk_group * experts per group")

    @property
    def head_dim(self) -> int:
        """MHA (Tiny) head width."""
        return self.hidden_size // self.num_attention_heads

    @property
    def q_head_dim(self) -> int:
        """MLA query/key head width: nope + rope."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def expert_width(self) -> int | None:
        """A routed expert's intermediate width; None without routed experts."""
        return self.moe_intermediate_size if self.n_routed_experts else None

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts is not None and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)


@dataclass(frozen=True)
class VL2Config:
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    projector_config: ProjectorConfig = field(default_factory=ProjectorConfig)
    language_config: LanguageConfig = field(default_factory=LanguageConfig)
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: list = field(default_factory=lambda: [[384, 384]])
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        _check(self.tile_tag in TILE_TAGS, "tile_tag", self.tile_tag, " or ".join(TILE_TAGS))
        _check(self.global_view_pos in GLOBAL_VIEW_POS, "global_view_pos", self.global_view_pos,
               " or ".join(GLOBAL_VIEW_POS))
        res = self.candidate_resolutions
        _check(isinstance(res, list) and 0 < len(res) <= 256 and all(
            isinstance(r, (list, tuple)) and len(r) == 2 and
            all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_IMAGE for v in r)
            for r in res), "candidate_resolutions", res,
            f"a non-empty list (at most 256) of [width, height] pairs in [1, {MAX_IMAGE}]")
        v, p = self.vision_config, self.projector_config
        _check(p.input_dim == v.width, "projector_config.input_dim", p.input_dim, f"vision width {v.width}")
        _check(p.n_embed == self.language_config.hidden_size, "projector_config.n_embed", p.n_embed,
               f"language hidden_size {self.language_config.hidden_size}")

    @property
    def tokens_per_side(self) -> int:
        """Merged tokens per tile side: ceil(27 / 2) = 14 (the grid is padded bottom/right)."""
        return -(-self.vision_config.grid // self.projector_config.downsample_ratio)

    # -- (de)serialisation ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict) -> VL2Config:
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        mt = d.get("model_type", "deepseek_vl_v2")
        if mt != "deepseek_vl_v2":
            raise ConfigError(f"config model_type = {mt!r}: this is not a DeepSeek-VL2 checkpoint "
                              "(expected 'deepseek_vl_v2')")
        _refuse_siblings(d)
        top = _typed(_TopLevel, "", d)
        return cls(
            vision_config=_typed(VisionConfig, "vision_config", d.get("vision_config", {})),
            projector_config=_typed(ProjectorConfig, "projector_config", d.get("projector_config", {})),
            language_config=_typed(LanguageConfig, "language_config", d.get("language_config", {})),
            **dataclasses.asdict(top),
        )

    @classmethod
    def from_pretrained(cls, path) -> VL2Config:
        """Read `config.json` from a model directory (or the file itself)."""
        p = Path(path)
        try:
            file = p / "config.json" if p.is_dir() else p
            found = file.is_file()
        except OSError as e:  # a name too long, a path through a file
            raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
        if not found:
            raise ConfigError(f"no config.json at {file}: is {path} a DeepSeek-VL2 model directory?")
        return cls.from_dict(schema.load_file(file))

    def to_dict(self) -> dict:
        """The official config.json shape (plus every field explicitly, so defaults never drift)."""
        return {
            "candidate_resolutions": [list(r) for r in self.candidate_resolutions],
            "global_view_pos": self.global_view_pos,
            "language_config": {**dataclasses.asdict(self.language_config), "model_type": "deepseek_v2"},
            "model_type": "deepseek_vl_v2",
            "projector_config": {**dataclasses.asdict(self.projector_config), "model_type": "mlp_projector"},
            "tile_tag": self.tile_tag,
            "torch_dtype": self.torch_dtype,
            "vision_config": {**dataclasses.asdict(self.vision_config), "model_type": "vision"},
        }

    def replace(self, **sections) -> VL2Config:
        """Copy with fields of sub-configs changed: `cfg.replace(language_config={"vocab_size": 512})`."""
        kw = {k: dataclasses.replace(getattr(self, k), **v) if isinstance(v, dict) else v
              for k, v in sections.items()}
        return dataclasses.replace(self, **kw)

    # -- the tensors an official checkpoint of this config holds --------------------------------------

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> shape for every tensor of the official checkpoint layout, in a stable order.

        Includes `vision.attn_pool.*` (a MAP head the reference builds and saves but never runs).
        """
        v, lc = self.vision_config, self.language_config
        W, M = v.width, v.mlp_hidden
        S: dict[str, tuple[int, ...]] = {}
        S["vision.pos_embed"] = (1, v.grid * v.grid, W)
        S["vision.patch_embed.proj.weight"] = (W, 3, v.patch_size, v.patch_size)
        S["vision.patch_embed.proj.bias"] = (W,)
        for i in range(v.layers):
            b = f"vision.blocks.{i}."
            S |= {b + "norm1.weight": (W,), b + "norm1.bias": (W,),
                  b + "attn.qkv.weight": (3 * W, W), b + "attn.qkv.bias": (3 * W,),
                  b + "attn.proj.weight": (W, W), b + "attn.proj.bias": (W,),
                  b + "norm2.weight": (W,), b + "norm2.bias": (W,),
                  b + "mlp.fc1.weight": (M, W), b + "mlp.fc1.bias": (M,),
                  b + "mlp.fc2.weight": (W, M), b + "mlp.fc2.bias": (W,)}
        S["vision.norm.weight"], S["vision.norm.bias"] = (W,), (W,)
        a = "vision.attn_pool."
        S |= {a + "latent": (1, 1, W), a + "q.weight": (W, W), a + "q.bias": (W,),
              a + "kv.weight": (2 * W, W), a + "kv.bias": (2 * W,), a + "proj.weight": (W, W), a + "proj.bias": (W,),
              a + "norm.weight": (W,), a + "norm.bias": (W,), a + "mlp.fc1.weight": (M, W), a + "mlp.fc1.bias": (M,),
              a + "mlp.fc2.weight": (W, M), a + "mlp.fc2.bias": (W,)}
        for j, (o, i) in enumerate(self.projector_config.linear_shapes):
            S[f"projector.layers.{2 * j}.weight"], S[f"projector.layers.{2 * j}.bias"] = (o, i), (o,)
        D = lc.hidden_size
        S["image_newline"], S["view_seperator"] = (D,), (D,)  # sic: the checkpoint spells it "seperator"
        S["language.model.embed_tokens.weight"] = (lc.vocab_size, D)
        for i in range(lc.num_hidden_layers):
            S |= _layer_shapes(lc, i, f"language.model.layers.{i}.")
        S["language.model.norm.weight"] = (D,)
        S["language.lm_head.weight"] = (lc.vocab_size, D)
        return S

    def num_params(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total


@dataclass(frozen=True)
class _TopLevel:
    tile_tag: str = "2D"  # the reference defaults to the string "tile_tag", which crashes model construction
    global_view_pos: str = "head"
    candidate_resolutions: list = field(default_factory=lambda: [[384, 384]])
    torch_dtype: str = "bfloat16"


def _layer_shapes(lc: LanguageConfig, i: int, p: str) -> dict[str, tuple[int, ...]]:
    D, H = lc.hidden_size, lc.num_attention_heads
    S: dict[str, tuple[int, ...]] = {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,)}
    a = p + "self_attn."
    bias = lc.attention_bias
    if lc.use_mla:
        qd, r = lc.q_head_dim, lc.qk_rope_head_dim
        assert lc.kv_lora_rank is not None  # __post_init__ requires it with MLA
        if lc.q_lora_rank is None:
            S[a + "q_proj.weight"] = (H * qd, D)
        else:
            S[a + "q_a_proj.weight"] = (lc.q_lora_rank, D)
            if bias:
                S[a + "q_a_proj.bias"] = (lc.q_lora_rank,)
            S[a + "q_a_layernorm.weight"] = (lc.q_lora_rank,)
            S[a + "q_b_proj.weight"] = (H * qd, lc.q_lora_rank)
        S[a + "kv_a_proj_with_mqa.weight"] = (lc.kv_lora_rank + r, D)
        if bias:
            S[a + "kv_a_proj_with_mqa.bias"] = (lc.kv_lora_rank + r,)
        S[a + "kv_a_layernorm.weight"] = (lc.kv_lora_rank,)
        S[a + "kv_b_proj.weight"] = (H * (lc.qk_nope_head_dim + lc.v_head_dim), lc.kv_lora_rank)
        S[a + "o_proj.weight"] = (D, H * lc.v_head_dim)
        if bias:
            S[a + "o_proj.bias"] = (D,)
    else:
        hd, kv = lc.head_dim, lc.num_key_value_heads
        assert kv is not None  # __post_init__ fills it from num_attention_heads
        for name, out in (("q_proj", H * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            S[a + name + ".weight"] = (out, D)
            if bias:
                S[a + name + ".bias"] = (out,)
        S[a + "o_proj.weight"] = (D, H * hd)
        if bias:
            S[a + "o_proj.bias"] = (D,)
    m = p + "mlp."
    if lc.is_moe_layer(i):
        E, inter = lc.n_routed_experts, lc.moe_intermediate_size
        assert E is not None  # is_moe_layer is only true with routed experts
        S[m + "gate.weight"] = (E, D)
        if lc.topk_method == "noaux_tc":
            S[m + "gate.e_score_correction_bias"] = (E,)
        for e in range(E):
            S |= _mlp_shapes(f"{m}experts.{e}.", D, inter)
        if lc.n_shared_experts is not None:
            S |= _mlp_shapes(m + "shared_experts.", D, inter * lc.n_shared_experts)
    else:
        S |= _mlp_shapes(m, D, lc.intermediate_size)
    return S


def _mlp_shapes(p: str, D: int, inter: int) -> dict[str, tuple[int, int]]:
    return {p + "gate_proj.weight": (inter, D), p + "up_proj.weight": (inter, D), p + "down_proj.weight": (D, inter)}
