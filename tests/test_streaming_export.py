"""The streaming export (export/decoder.py, export/splice.py) and the fits check (vl2edge/fits.py): the
decoder built a layer at a time answers like torch, its peak memory does not grow with depth, and a
model too big for the machine stops before anything is read."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

from tests import golden
from vl2edge import fits
from vl2edge.config import VL2Config
from vl2edge.cpu_features import u8s8_exact
from vl2edge.export import build
from vl2edge.export.build import export
from vl2edge.generate import prefill
from vl2edge.info import onnx_resident, report
from vl2edge.models.loading import load_model
from vl2edge.onnx_backend import OnnxModel
from vl2edge.presets import preset


@pytest.mark.parametrize("variant", golden.VARIANTS)
def test_each_layer_is_checked_against_its_torch_module(variant, tmp_path):
    """accuracy_level 0: each layer's graph computes its torch module, so every piece's check is exact; and
    the spliced graph equals the torch model end to end, over a chunked prefill and decode steps."""
    d = export(golden.model_dir(variant), tmp_path / "e", "int4-experts", vision="float", accuracy_level=0,
               progress=False)
    m = json.loads((d / "manifest.json").read_text())
    layers = m["verification"]["decoder_layers"]
    assert [r["layer"] for r in layers["layers"]] == list(range(m["dims"]["num_hidden_layers"]))
    assert layers["rel_l2"] < 1e-5 and layers["head"]["rel_l2"] < 1e-5
    assert m["verification"]["decoder"]["rel_l2"] < 1e-5 and "scope" not in m["verification"]["decoder"]
    tm = load_model(golden.model_dir(variant), dtype="float32", device="cpu", quant="int4-experts",
                    kernel="dequant").model
    om = OnnxModel(d)
    ids, _, images, seq_mask, crop = golden.model_args("landscape_1024x768")
    e = tm.embed(ids, images, seq_mask, crop)
    T = e.shape[1]
    for chunk in (T, 61):
        ref, got = [], []
        for dec, emb, out in ((tm, e, ref), (om, e.numpy(), got)):
            cache = dec.new_cache(1, T + 2)
            out.append(prefill(dec, emb, np.ones((1, T), bool), cache, chunk_size=chunk))
            out += [dec.decode(np.array([t]), cache) for t in (3, 7)]
        ref, got = np.concatenate(ref), np.concatenate(got)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), chunk


def test_a_big_decoder_is_verified_layer_by_layer(tmp_path, monkeypatch):
    """Above END_TO_END_MAX the whole graph is not run at export time: the manifest says so and carries the
    worst piece's errors; the graph it wrote still answers like the one verified end to end."""
    monkeypatch.setattr(build, "END_TO_END_MAX", 0)
    d = export(golden.model_dir("small"), tmp_path / "e", "int4-experts", vision="float", accuracy_level=0,
               progress=False)
    dec = json.loads((d / "manifest.json").read_text())["verification"]["decoder"]
    assert "layer by layer" in dec["scope"] and dec["rel_l2"] < 1e-5
    graph = onnx.load(str(d / "decoder.onnx"), load_external_data=False).graph
    assert {i.name for i in graph.input} >= {"inputs_embeds", "attention_mask", "past_key_values.0.latent"}
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    names = [t.name for t in graph.initializer]
    assert len(names) == len(set(names))
    om, ref = OnnxModel(d), load_model(golden.model_dir("small"), dtype="float32", device="cpu",
                                       quant="int4-experts", kernel="dequant").model
    ids, att, images, seq_mask, crop = golden.model_args("square_384")
    want = ref.logits(ids, att, images, seq_mask, crop)[0, -1].numpy()
    e = om.embed(ids, images, seq_mask, crop)
    got = om.prefill(e, om.new_cache(1, e.shape[1]), np.ones((1, e.shape[1]), bool))[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


PEAK = textwrap.dedent("""
    import json, resource, sys
    from vl2edge.export import build
    build.END_TO_END_MAX = 0  # the whole graph's check runs only for small decoders; this measures the stream
    build.export(sys.argv[1], sys.argv[2], "int4-experts", vision="float", progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


def _deep(layers: int, width: int) -> VL2Config:
    """A test model `layers` deep whose decoder layers are wide (tens of MB each) and vision tower tiny."""
    d = preset("test-mha").to_dict()
    d["language_config"] |= {"num_hidden_layers": layers, "hidden_size": width, "intermediate_size": 2 * width,
                             "moe_intermediate_size": width, "n_routed_experts": 16, "num_attention_heads": 8,
                             "num_key_value_heads": 8}
    d["projector_config"] |= {"n_embed": width}
    return VL2Config.from_dict(d)


def test_export_peak_does_not_grow_with_depth(tmp_path):
    """The same layers, 2 and 8 of them: the 6 more layers hold ~150 MB of float weights (the tracing export
    held them all, several times over); the streaming export's peak moves by less than a third of that."""
    from vl2edge.synthetic import write_model

    peaks, weights = {}, {}
    for layers in (2, 8):
        src = write_model(_deep(layers, 512), tmp_path / f"m{layers}", dtype="float32")
        weights[layers] = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        r = subprocess.run([sys.executable, "-c", PEAK, str(src), str(tmp_path / f"o{layers}")], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[layers] = int(r.stdout.split()[-1])
    grown = weights[8] - weights[2]
    assert grown > 120e6
    assert peaks[8] - peaks[2] < grown / 3, (peaks, grown)


# -- fits ------------------------------------------------------------------------------------------------

def _config_only(tmp_path, name: str, scale_layers: int = 1):
    """A model directory with a config.json alone (no weights): anything that opens a weight fails."""
    d = preset(name).to_dict()
    d["language_config"]["num_hidden_layers"] *= scale_layers
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "vl2edge", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_a_model_too_big_stops_before_anything_is_read(tmp_path):
    (tmp_path / "m").mkdir()
    model = _config_only(tmp_path / "m", "deepseek-vl2", scale_layers=8)  # ~8x Base: more than any machine here
    need = fits.needs(VL2Config.from_pretrained(model))
    assert need.run > fits.available_memory()
    r = _cli("run", "--model", str(model), "--prompt", "hi", "--backend", "onnx")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "does not fit this machine" in r.stderr and f"~{need.run / 2**30:.1f} GiB of memory" in r.stderr
    assert "--force" in r.stderr
    r = _cli("export", "--model", str(model), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "does not fit this machine" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
    # --force goes on: and finds no weights, which is what the check stood in front of
    r = _cli("run", "--model", str(model), "--prompt", "hi", "--backend", "onnx", "--force")
    assert r.returncode == 2 and "does not fit" not in r.stderr and "Traceback" not in r.stderr


def test_the_check_uses_the_estimate_info_prints(tmp_path):
    config = preset("deepseek-vl2")
    G = 2**30
    line = next(x for x in report(config).splitlines() if x.startswith("| int4-experts |"))
    shown = line.split("|")[5].strip()
    est = onnx_resident(config, "int4-experts", config.language_config.max_position_embeddings)["resident"]
    assert shown == f"~{est / G:.1f} GiB"
    with pytest.raises(Exception) as err:
        fits.check(config, "base", None, memory=int(fits.needs(config).run * 0.9))
    assert shown in str(err.value) and "DeepSeek-VL2-Tiny" in str(err.value)
    fits.check(config, "base", None, memory=fits.needs(config).run + 1)  # fits: no error
    with pytest.raises(Exception) as err:
        fits.check(config, "base", tmp_path, memory=2**50, disk=1)
    assert "of disk" in str(err.value)


def test_the_8bit_linears_use_matmulinteger_only_where_it_is_exact(tmp_path):
    """x86 without VNNI saturates u8s8's int16 pair sums: there the export keeps the 8-bit linears on
    MatMulNBits and builds no int8 vision graph by default. Where u8s8_exact() says yes, the worst case
    (255 x 127 everywhere) comes out exact."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    K, N = 256, 64
    w = np.full((K, N), 127, np.int8)
    w[:, ::2] = -127
    g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w", "za"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, K])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [4, N])],
                          initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.uint8(128), "za")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    a = np.array([[255] * K, [0] * K, [128 + 90] * K, [7] * K], np.uint8)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    exact = bool(np.array_equal(y, (a.astype(np.int64) - 128) @ w.astype(np.int64)))
    if u8s8_exact():
        assert exact
    d = export(golden.model_dir("tiny"), tmp_path / "e", "int4-experts", progress=False)  # vision "auto"
    ops = {n.op_type for n in onnx.load(str(d / "decoder.onnx"), load_external_data=False).graph.node}
    assert ("MatMulInteger" in ops) == u8s8_exact()
    # nor is the int8 vision graph built by default where it cannot pass its gate
    assert ("vision_int8" in json.loads((d / "manifest.json").read_text())["graphs"]) == u8s8_exact()


def test_an_int4_mla_model_exports(tmp_path):
    """The int4 recipe quantizes MLA's kv_b_proj to 4 bits; the absorbed attention reads it as a matrix,
    which the export makes a float constant (unpacking 4-bit weights is a bitwise AND the tracer refuses)."""
    d = export(golden.model_dir("base"), tmp_path / "e", "int4", vision="float", accuracy_level=0, progress=False)
    m = json.loads((d / "manifest.json").read_text())
    assert m["quantization"]["language.model.layers.0.self_attn.kv_b_proj.weight"]["bits"] == 4
    assert m["verification"]["decoder"]["rel_l2"] < 1e-5


def test_the_export_of_a_generated_checkpoint_is_the_export_of_the_written_one(tmp_path):
    """Full-size Base is exported from a checkpoint generated when read: the same interface as files, so
    the same graphs and data, byte for byte."""
    from vl2edge import synthetic

    manifests = []
    for kind in ("written", "generated"):
        src = synthetic.write_model("test-mla", tmp_path / kind, dtype="bfloat16", generated=kind == "generated")
        export(src, tmp_path / f"{kind}-onnx", "int4-experts", progress=False)
        manifests.append(json.loads((tmp_path / f"{kind}-onnx" / "manifest.json").read_text()))
    assert manifests[0]["files"] == manifests[1]["files"]
