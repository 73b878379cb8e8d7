"""The runtime core (config, processor, weights, synthetic checkpoints) must work without torch."""

import subprocess
import sys
import textwrap

from tests.golden import NO_TORCH


def test_core_runs_with_torch_unimportable(tmp_path):
    script = NO_TORCH + textwrap.dedent(f"""
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
        assert "torch" not in sys.modules
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
