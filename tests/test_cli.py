import json
import shutil
import subprocess
import sys

import pytest

from tests import golden
from vl2edge import cli
from vl2edge.synthetic import sample_image, write_model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    write_model("test-mha", d / "model")
    sample_image().save(d / "demo.png")
    return d


def _run(capsys, *args):
    cli.main(list(args))
    return capsys.readouterr()


def test_run_streams_text_and_reports_speed(demo, capsys):
    out = _run(capsys, "run", "--model", str(demo / "model"), "--image", str(demo / "demo.png"), "--prompt",
               "Describe this image.", "--max-new-tokens", "6", "--device", "cpu")
    js = _run(capsys, "run", "--model", str(demo / "model"), "--image", str(demo / "demo.png"), "--prompt",
              "Describe this image.", "--max-new-tokens", "6", "--json")
    res = json.loads(js.out)
    assert out.out == res["text"]
    assert len(res["token_ids"]) == 6 and res["finish_reason"] == "length" and res["peak_rss_bytes"] > 0
    assert res["prompt_tokens"] > 1000  # a 640x480 picture is 1023 image tokens
    assert "TTFT" in out.err and "tok/s" in out.err and "peak RSS" in out.err


def test_run_reproduces_the_reference_answer(capsys):
    conv, images = golden.conversation("portrait_360x1000")
    js = _run(capsys, "run", "--model", str(golden.model_dir("base")), "--image", str(images[0]), "--prompt",
              conv[0]["content"], "--max-new-tokens", "8", "--dtype", "float32", "--json")
    assert json.loads(js.out)["token_ids"] == golden.expected("base", "portrait_360x1000")["gen_token_ids"].tolist()


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "no such model directory"),
    (["--image", "/nonexistent.png"], "image not found"),
    (["--prompt", "<image><image> two?"], "2 <image> placeholder"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
])
def test_user_mistakes_exit_2_with_one_line(demo, capsys, args, message):
    base = {"--model": str(demo / "model"), "--image": str(demo / "demo.png"), "--prompt": "hi"}
    base.update(dict(zip(args[::2], args[1::2])))
    with pytest.raises(SystemExit) as e:
        cli.main(["run", *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    shutil.copytree(golden.model_dir("tiny"), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100_000])
    r = subprocess.run([sys.executable, "-m", "vl2edge", "run", "--model", str(tmp_path / "m"), "--prompt", "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_run_quantizes_while_loading(capsys):
    js = _run(capsys, "run", "--model", str(golden.model_dir("small")), "--prompt", "Hello", "--max-new-tokens", "4",
              "--quant", "int8", "--json", "--dtype", "float32")
    import vl2edge

    ref = vl2edge.load(golden.model_dir("small"), device="cpu", dtype="float32", quant="int8")
    assert json.loads(js.out)["token_ids"] == ref.chat([{"role": "<|User|>", "content": "Hello"}],
                                                        max_new_tokens=4).token_ids
