"""The torch-free half of vl2edge works with torch unimportable: config, checkpoint I/O, synthetic
checkpoints, the processor, `vl2edge info` and float -> packed conversion (`vl2edge quantize`).
(The ONNX backend's run without torch is in test_export.py.)"""

import json
import subprocess
import sys
import textwrap

from tests.golden import NO_TORCH


def _run_without_torch(body: str) -> subprocess.CompletedProcess:
    script = NO_TORCH + textwrap.dedent(body) + "\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


def test_core_runs_with_torch_unimportable(tmp_path):
    r = _run_without_torch(f"""
        import vl2edge
        from vl2edge import synthetic
        from vl2edge.weights import Checkpoint
        out = synthetic.write_model("test-mla-noaux", {str(tmp_path)!r} + "/m", dtype="bfloat16")
        ck = Checkpoint.open(out)
        ck.check_keys(vl2edge.VL2Config.from_pretrained(out).tensor_shapes())
        assert ck.numpy("view_seperator").dtype.name == "float32"
        proc = vl2edge.Processor.from_pretrained(out)
        res = proc([{{"role": "user", "content": "<image> hi"}}], [synthetic.sample_image()])
        assert res.images.shape == (1, 5, 3, 384, 384)
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_info_and_quantize_commands_run_with_torch_unimportable(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    r = _run_without_torch(f"""
        from vl2edge import cli, synthetic
        synthetic.write_model("test-mha", {str(src)!r})
        cli.main(["info", "--model", {str(src)!r}, "--gpu-memory", "1GiB"])
        cli.main(["info", "--model", "deepseek-vl2-small"])
        cli.main(["quantize", {str(src)!r}, {str(dst)!r}, "--recipe", "int4-experts"])
    """)
    assert r.returncode == 0, r.stderr
    assert "16.13B parameters (2.88B active per token)" in r.stdout  # the Small preset (attn_pool not counted)
    assert "| int4-experts | 0.00 | 0.00 | resident |" in r.stdout  # the test model fits 1 GiB
    manifest = json.loads((dst / "quantization.json").read_text())
    assert manifest["tensors"]["language.model.layers.1.mlp.experts.0.up_proj.weight"]["bits"] == 4
    assert f"wrote {dst}" in r.stdout


def test_the_torch_boundary_is_the_layout():
    """Every module outside vl2edge.models, vl2edge.export, vl2edge.quant.modules and the demo trainer (and its
    checkpoints) imports without torch."""
    r = _run_without_torch("""
        import importlib, pkgutil
        import vl2edge, vl2edge.quant
        torch_side = {"vl2edge.models", "vl2edge.export", "vl2edge.quant.modules", "vl2edge.__main__",
                      "vl2edge.quant.__main__", "vl2edge.train_demo", "vl2edge.train_state"}
        names = [f"vl2edge.{m.name}" for m in pkgutil.iter_modules(vl2edge.__path__)]
        names += [f"vl2edge.quant.{m.name}" for m in pkgutil.iter_modules(vl2edge.quant.__path__)]
        checked = [n for n in names if n not in torch_side]
        for name in checked:
            importlib.import_module(name)
        print(len(checked), " ".join(sorted(checked)))
    """)
    assert r.returncode == 0, r.stderr
    count, names = r.stdout.split(maxsplit=1)
    assert int(count) >= 20 and "vl2edge.quant.convert" in names and "vl2edge.info" in names


def test_the_cpu_default_does_not_import_torch_to_look_for_a_gpu():
    """On a machine with no NVIDIA driver or device node, choosing the backend costs no torch import (~1 s of
    every CLI run on the CPU: `vl2edge run` on the demo went from 1.40 to 0.24 s)."""
    import pytest

    from vl2edge.pipeline import _gpu_nodes

    if _gpu_nodes():
        pytest.skip("this machine has GPU device nodes: torch is rightly asked")
    code = ("import sys; from vl2edge.pipeline import _cpu_only; assert _cpu_only('auto'); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
