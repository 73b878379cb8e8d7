"""Model presets: the three released DeepSeek-VL2 configurations and small test models.

`preset(name)` -> VL2Config for `deepseek-vl2-tiny`, `deepseek-vl2-small`, `deepseek-vl2` (the released
config.json files) and `test-mha`, `test-mla`, `test-mla-noaux` (3-layer models shaped like Tiny, Small
and Base, for tests and the demo). Parameter counts of the released presets equal the checkpoints'.
"""

from __future__ import annotations

from .config import OFFICIAL_RESOLUTIONS, VL2Config
from .errors import ConfigError

_SIGLIP_SO400M = {"layers": 27, "mlp_ratio": 3.7362, "model_name": "siglip_so400m_patch14_384",
                  "patch_size": 14, "width": 1152}
_COMMON_LM = {"bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "max_position_embeddings": 4096,
              "n_shared_experts": 2, "num_experts_per_tok": 6}

# The released config.json files (the hub repos deepseek-ai/deepseek-vl2{-tiny,-small,}; Base is
# verbatim; absent keys take the DeepseekV2Config defaults, e.g. Base's 30 layers and 32 heads).
OFFICIAL = {
    "deepseek-vl2-tiny": {
        "language_config": {**_COMMON_LM, "vocab_size": 129280, "hidden_size": 1280, "intermediate_size": 6848,
                            "moe_intermediate_size": 896, "num_hidden_layers": 12, "num_attention_heads": 10,
                            "num_key_value_heads": 10, "n_routed_experts": 64, "topk_method": "greedy",
                            "n_group": 1, "topk_group": 1, "use_mla": False, "q_lora_rank": None,
                            "kv_lora_rank": None, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "v_head_dim": 0},
        "projector_config": {"n_embed": 1280},
    },
    "deepseek-vl2-small": {
        "language_config": {**_COMMON_LM, "bos_token_id": 100000, "eos_token_id": 100001, "vocab_size": 102400,
                            "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
                            "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
                            "n_routed_experts": 64, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                            "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
                            "qk_rope_head_dim": 64, "v_head_dim": 128},
        "projector_config": {"n_embed": 2048},
    },
    "deepseek-vl2": {
        "language_config": {**_COMMON_LM, "vocab_size": 129280, "hidden_size": 2560, "intermediate_size": 12288,
                            "moe_intermediate_size": 1536, "n_routed_experts": 72, "norm_topk_prob": True,
                            "q_lora_rank": None, "routed_scaling_factor": 2.0, "scoring_func": "sigmoid",
                            "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1},
        "projector_config": {"n_embed": 2560},
    },
}
for _d in OFFICIAL.values():
    _d.update({"candidate_resolutions": OFFICIAL_RESOLUTIONS, "global_view_pos": "head", "tile_tag": "2D",
               "model_type": "deepseek_vl_v2", "torch_dtype": "bfloat16", "vision_config": dict(_SIGLIP_SO400M)})


def tiny(attention: str = "mha", vocab_size: int = 512) -> VL2Config:
    """A small random-weight-friendly config: 3 layers (1 dense + 2 MoE), shrunk vision tower.

    attention: "mha" (like Tiny), "mla" (like Small) or "mla-noaux" (like Base: q-LoRA, sigmoid +
    noaux_tc routing over 4 groups, norm_topk_prob, scaling 2.0).
    """
    lm = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 176, "moe_intermediate_size": 32,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
          "n_shared_experts": 2, "num_experts_per_tok": 3, "first_k_dense_replace": 1, "topk_method": "greedy",
          "n_group": 1, "topk_group": 1, "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 1}
    if attention == "mha":
        lm |= {"use_mla": False, "q_lora_rank": None, "kv_lora_rank": None, "qk_nope_head_dim": 0,
               "qk_rope_head_dim": 0, "v_head_dim": 0}
    elif attention == "mla":
        lm |= {"use_mla": True, "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
               "qk_rope_head_dim": 8, "v_head_dim": 16}
    elif attention == "mla-noaux":
        lm |= {"use_mla": True, "q_lora_rank": 24, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
               "v_head_dim": 16, "n_routed_experts": 12, "num_experts_per_tok": 4, "topk_method": "noaux_tc",
               "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
               "routed_scaling_factor": 2.0}
    else:
        raise ConfigError(f"tiny(attention={attention!r}): expected 'mha', 'mla' or 'mla-noaux'")
    return VL2Config.from_dict({
        "candidate_resolutions": OFFICIAL_RESOLUTIONS, "tile_tag": "2D", "global_view_pos": "head",
        "torch_dtype": "float32", "language_config": lm,
        "vision_config": {"layers": 2, "width": 64, "heads": 4, "mlp_ratio": 3.7362, "patch_size": 14,
                          "model_name": "siglip_so400m_patch14_384"},
        "projector_config": {"input_dim": 64, "n_embed": 64},
    })


TEST_PRESETS = {"test-mha": "mha", "test-mla": "mla", "test-mla-noaux": "mla-noaux"}
PRESETS = (*OFFICIAL, *TEST_PRESETS)


def preset(name: str) -> VL2Config:
    """A named config: an official model (`deepseek-vl2-tiny|-small`, `deepseek-vl2`) or a test model."""
    if name in OFFICIAL:
        return VL2Config.from_dict(OFFICIAL[name])
    if name in TEST_PRESETS:
        return tiny(TEST_PRESETS[name])
    raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
