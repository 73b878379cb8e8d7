import json

import pytest

from tests import golden
from vl2edge.config import VL2Config
from vl2edge.errors import ConfigError
from vl2edge.presets import OFFICIAL, PRESETS, preset, tiny
from vl2edge.weights import Checkpoint

# Totals and tensor counts of the released checkpoints (counted from the reference modules in
# deepseek_vl2/models/ and confirmed by the Hugging Face shard sizes).
RELEASED = {
    "deepseek-vl2-tiny": (3_370_501_440, 2582),
    "deepseek-vl2-small": (16_148_349_504, 5639),
    "deepseek-vl2": (27_480_134_248, 6973),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_official_configs_imply_the_released_checkpoints(name):
    cfg = preset(name)
    params, tensors = RELEASED[name]
    assert cfg.num_params() == params
    assert len(cfg.tensor_shapes()) == tensors


def test_official_dims():
    t, s, b = (preset(n).language_config for n in RELEASED)
    assert (t.use_mla, t.head_dim, t.num_hidden_layers, t.n_routed_experts) == (False, 128, 12, 64)
    assert (s.use_mla, s.q_lora_rank, s.kv_lora_rank, s.q_head_dim, s.vocab_size) == (True, None, 512, 192, 102400)
    # Base's config.json omits the layer and head counts: the DeepseekV2Config defaults (30, 32) apply
    assert "num_hidden_layers" not in OFFICIAL["deepseek-vl2"]["language_config"]
    assert (b.num_hidden_layers, b.num_attention_heads, b.kv_lora_rank) == (30, 32, 512)
    assert (b.topk_method, b.scoring_func, b.norm_topk_prob, b.routed_scaling_factor) == ("noaux_tc", "sigmoid",
                                                                                          True, 2.0)
    v = preset("deepseek-vl2-tiny").vision_config
    assert (v.width, v.layers, v.heads, v.mlp_hidden, v.grid) == (1152, 27, 16, 4304, 27)


@pytest.mark.parametrize("variant", golden.VARIANTS)
def test_fixture_config_matches_its_checkpoint(variant):
    cfg = VL2Config.from_pretrained(golden.model_dir(variant))
    ck = Checkpoint.open(golden.model_dir(variant))
    shapes = cfg.tensor_shapes()
    ck.check_keys(shapes)
    ck.check_shapes(shapes)
    assert cfg.language_config.use_mla == (variant != "tiny")
    assert cfg.vision_config.heads == {"tiny": 4, "small": 4, "base": 6}[variant]


def test_unknown_keys_ignored_and_round_trip():
    d = json.loads(json.dumps(OFFICIAL["deepseek-vl2"]))
    d["something_new"] = 1
    d["language_config"]["aux_loss_alpha"] = 0.001
    d["vision_config"]["global_pool"] = "map"
    cfg = VL2Config.from_dict(d)
    assert VL2Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("section,key,value", [
    ("language_config", "topk_method", "gready"),
    ("language_config", "topk_method", "random"),
    ("language_config", "scoring_func", "tanh"),
    ("language_config", "use_mla", "yes"),
    ("language_config", "hidden_size", "2560"),
    ("language_config", "rope_scaling", {"type": "yarn", "factor": 4}),
    ("language_config", "n_group", 5),
    (None, "tile_tag", "1D"),
    (None, "tile_tag", "tile_tag"),
    (None, "global_view_pos", "middle"),
    ("projector_config", "projector_type", "mlp_gelu"),
    ("vision_config", "heads", 7),
])
def test_bad_values_are_rejected_naming_the_key(section, key, value):
    d = json.loads(json.dumps(OFFICIAL["deepseek-vl2"]))
    (d[section] if section else d)[key] = value
    with pytest.raises(ConfigError, match=key):
        VL2Config.from_dict(d)


def test_not_a_vl2_config(tmp_path):
    with pytest.raises(ConfigError, match="not a DeepSeek-VL2"):
        VL2Config.from_dict({"model_type": "qwen2_vl"})
    with pytest.raises(ConfigError, match="no config.json"):
        VL2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        VL2Config.from_pretrained(tmp_path)


def test_tiny_presets_cover_the_three_families():
    mha, mla, noaux = tiny("mha").language_config, tiny("mla").language_config, tiny("mla-noaux").language_config
    assert not mha.use_mla and mla.use_mla and mla.q_lora_rank is None
    assert noaux.q_lora_rank and noaux.topk_method == "noaux_tc" and noaux.n_group > 1
    assert [n for n in PRESETS if n.startswith("test-")] == ["test-mha", "test-mla", "test-mla-noaux"]
    with pytest.raises(ConfigError):
        preset("deepseek-vl3")
