"""`make demo` (vl2edge/demo_run.py): the answers are judged against what was drawn, the box is drawn."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vl2edge import demo_run, demo_tasks


@dataclass
class _Said:
    text: str


class _Pipe:
    """Answers as told: the number and the box of what was drawn (shifted by `shift` px), or nonsense."""

    def __init__(self, drawn: dict, shift: int = 0, nonsense: bool = False):
        self.drawn, self.shift, self.nonsense = drawn, shift, nonsense

    def chat(self, messages, images, max_new_tokens):
        if self.nonsense:
            return _Said("I do not know.")
        if demo_tasks.NUMBER_PROMPT in messages[0]["content"]:
            return _Said(self.drawn["number"] + ("1" if self.shift else ""))
        W, H = images[0].size
        x1, y1, x2, y2 = (v + self.shift for v in self.drawn["box"])
        norm = [round(v * 999 / s) for v, s in zip((x1, y1, x2, y2), (W, H, W, H))]
        return _Said(f"<|ref|>the red square<|/ref|><|det|>[[{norm[0]}, {norm[1]}, {norm[2]}, {norm[3]}]]<|/det|>")


def _show(tmp_path, seed, **pipe_kw):
    drawn = demo_tasks.demo_pictures(tmp_path / "truth", seed)  # what show() will draw with this seed
    lines: list[str] = []
    verdict = demo_run.show(tmp_path / "model", tmp_path / "out", seed, lines.append, _Pipe(drawn, **pipe_kw))
    return drawn, verdict, "\n".join(lines)


def test_right_answers_are_called_right_and_the_box_is_drawn(tmp_path):
    drawn, verdict, said = _show(tmp_path, 5)
    assert verdict == {"number": True, "box": True}
    assert f"{drawn['number']} is written there; the model read '{drawn['number']}': right" in said
    assert float(said.split("(IoU ")[1][:4]) > 0.95 and said.count(": right") == 2  # 0..999 rounding only
    before = np.asarray(Image.open(tmp_path / "out" / "shapes.png").convert("RGB"))
    after = np.asarray(Image.open(tmp_path / "out" / "shapes-box.png").convert("RGB"))
    assert before.shape == after.shape and (before != after).any(axis=-1).sum() > 100  # an outline was drawn
    assert "vl2edge run --model" in said and "--draw" in said


def test_wrong_answers_are_called_wrong(tmp_path):
    _, verdict, said = _show(tmp_path, 6, shift=60)  # a box 60 px off: IoU far below 0.5
    assert verdict == {"number": False, "box": False} and said.count(": wrong") == 2
    _, verdict, said = _show(tmp_path / "b", 7, nonsense=True)
    assert verdict == {"number": False, "box": False} and "the model gave no box" in said


def test_the_cli_refuses_a_missing_model_and_an_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    for args, words in ((["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "nope"),
                        (["--out", str(tmp_path / "file" / "sub")], "cannot write")):
        r = subprocess.run([sys.executable, "-m", "vl2edge.demo_run", *args], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error:") and words in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
