"""The demo model's rendered tasks and its training mechanics (vl2edge/demo_tasks.py, vl2edge/train_demo.py).

What is checked here holds for any trained weights: examples are a function of the seed, the pictures
hold what the answers say (ink where the number is, the named colour inside the box), scoring accepts
right answers and refuses wrong ones, the training batch's labels are exactly the answer and eos, the
trained weights round-trip through the official layout, and a training step lowers the loss.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from vl2edge import demo_tasks
from vl2edge.demo_tasks import COLORS, example, iou, score
from vl2edge.grounding import parse

torch = pytest.importorskip("torch")


def _same(a: demo_tasks.Example, b: demo_tasks.Example) -> bool:
    return (a.prompt, a.answer, a.box) == (b.prompt, b.answer, b.box) and all(
        x.tobytes() == y.tobytes() for x, y in zip(a.images, b.images))


@pytest.mark.parametrize("task", demo_tasks.TASKS)
def test_examples_are_a_function_of_the_seed(task):
    assert _same(example(task, random.Random(3)), example(task, random.Random(3)))
    drawn = [example(task, random.Random(s)) for s in range(8)]
    assert len({(e.answer, e.images[0].tobytes()) for e in drawn}) == 8


def _ink(img) -> tuple[int, int, int, int]:
    """Bounding box (x1, y1, x2, y2) of the dark pixels."""
    a = np.asarray(img.convert("L")) < 128
    ys, xs = np.nonzero(a)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("seed", range(12))
def test_number_pictures_hold_their_number_with_margins_up_to_half_its_size(seed):
    ex = example("number", random.Random(seed))
    assert ex.prompt == f"<image>\n{demo_tasks.NUMBER_PROMPT}" and 3 <= len(ex.answer) <= 5 and ex.answer[0] != "0"
    (img,) = ex.images
    W, H = img.size
    x1, y1, x2, y2 = _ink(img)
    assert 0 < x1 < x2 < W and 0 < y1 < y2 < H  # the whole number is inside the canvas
    assert y2 - y1 >= 12  # 24 px font: digits at least about half the size
    # margins of at most half the text plus 10 px; the font's bearings (up to ~20 px at 60 px) on top
    assert W - (x2 - x1) <= (x2 - x1) / 2 + 40 and H - (y2 - y1) <= (y2 - y1) / 2 + 40


def test_number_positions_vary_over_the_margins():
    spots = set()
    for s in range(40):
        img = example("number", random.Random(s)).images[0]
        x1, y1, x2, y2 = _ink(img)
        spots.add((round(4 * x1 / (img.width - x2 + x1)), round(4 * y1 / (img.height - y2 + y1))))
    assert len(spots) >= 8  # left/right and top/bottom placements all occur


@pytest.mark.parametrize("seed", range(8))
def test_wide_pictures_need_two_tiles_and_put_the_number_right(seed, small_processor):
    ex = example("wide", random.Random(seed))
    (img,) = ex.images
    W, H = img.size
    assert W >= 2 * H
    assert _ink(img)[0] >= W // 2
    out = small_processor([{"role": "user", "content": ex.prompt}], list(ex.images))
    assert out.images_spatial_crop.tolist() == [[[2, 1]]]  # two local tiles side by side; the number in the right one


@pytest.mark.parametrize("seed", range(12))
def test_grounding_answer_points_at_the_named_shape(seed):
    ex = example("ground", random.Random(seed))
    color = next(c for c in COLORS if f"the {c} " in ex.prompt)
    a = np.asarray(ex.images[0]).astype(int)
    mask = np.abs(a - np.asarray(COLORS[color])).sum(-1) == 0
    assert ex.box is not None
    x1, y1, x2, y2 = ex.box
    filled = mask[y1:y2, x1:x2].mean()
    assert filled > (0.99 if "square" in ex.prompt else 0.75)  # a square fills its box, a circle pi/4 of it
    ring = mask[max(0, y1 - 3):y2 + 3, max(0, x1 - 3):x2 + 3].sum() - mask[y1:y2, x1:x2].sum()
    assert ring == 0  # nothing of that colour just outside: the box is tight
    boxes = parse(ex.answer, [ex.images[0].size]).boxes
    assert len(boxes) == 1 and boxes[0].label in ex.prompt
    # the 0..999 round trip: the official int() may lose a pixel on each side
    assert boxes[0].pixels is not None and iou(boxes[0].pixels, ex.box) > 0.9
    assert score(ex, ex.answer)


def test_score_refuses_wrong_answers():
    num = example("number", random.Random(0))
    assert score(num, num.answer) and score(num, f" {num.answer}\n")
    assert not score(num, num.answer + "1") and not score(num, "")
    ground = example("ground", random.Random(1))
    assert ground.box is not None
    x1, y1, x2, y2 = ground.box
    W, H = ground.images[0].size
    side = x2 - x1

    def answer(dx):
        return (f"<|ref|>x<|/ref|><|det|>[[{round((x1 + dx) * 999 / W)}, {round(y1 * 999 / H)}, "
                f"{round((x2 + dx) * 999 / W)}, {round(y2 * 999 / H)}]]<|/det|>")
    assert score(ground, answer(side * 0.1))
    assert not score(ground, answer(side * 0.5))  # IoU 1/3
    assert not score(ground, "no box here")


def test_count_answer_names_the_image_with_more_circles():
    for s in range(6):
        ex = example("count", random.Random(s))
        assert len(ex.images) == 2 and ex.prompt.count("<image>") == 2
        assert ex.answer in ("The first image.", "The second image.")


# -- training mechanics ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_processor(small_model):
    from vl2edge.processor import Processor

    return Processor.from_pretrained(small_model[0])


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from vl2edge.models.loading import load_model
    from vl2edge.models.model import VL2Model
    from vl2edge.synthetic import write_model
    from vl2edge.train_demo import demo_config

    out = tmp_path_factory.mktemp("demo")
    config = demo_config("mha", width=32, hidden=64)
    write_model(config, out)
    model = VL2Model(config)
    model.load_state_dict(load_model(out, dtype="float32", device="cpu").model.state_dict())
    return out, model


def test_batch_labels_are_the_answer_and_eos(small_model):
    from vl2edge.processor import Processor
    from vl2edge.train_demo import make_batch

    out, _ = small_model
    proc = Processor.from_pretrained(out)
    batch, lens = make_batch(proc, "ground", 3, random.Random(7))
    first = example("ground", random.Random(7))  # the batch's first row, drawn again
    ids = batch.input_ids
    for b, n in enumerate(lens):
        assert ids[b, -1] == proc.eos_id and not batch.images_seq_mask[b, -n:].any()
    assert proc.decode(ids[0, -lens[0]:-1]) == first.answer


def _changed_copy(small_model, dst, change) -> None:
    """The small model's directory copied to `dst`, its weights changed in place by `change(i, p)` and saved."""
    import shutil

    from vl2edge.train_demo import save_weights

    out, model = small_model
    shutil.copytree(out, dst)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            change(i, p)
    save_weights(model, dst)


def test_trained_weights_round_trip_through_the_official_layout(small_model, tmp_path):
    from vl2edge.models.loading import load_model

    _, model = small_model
    dst = tmp_path / "m"
    _changed_copy(small_model, dst, lambda i, p: p.add_(0.01 * (i + 1)))  # differ everywhere, experts included
    back = load_model(dst, dtype="float32", device="cpu").model.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(back[name], t), name


@pytest.mark.parametrize("variant", ["mha", "mla-noaux"])
def test_a_training_step_lowers_the_loss(small_model, variant, tmp_path):
    from vl2edge.models.loading import load_model
    from vl2edge.models.model import VL2Model
    from vl2edge.processor import Processor
    from vl2edge.synthetic import write_model
    from vl2edge.train_demo import answer_loss, demo_config, make_batch

    out, model = small_model
    if variant != "mha":
        out = tmp_path / variant
        write_model(demo_config(variant, width=32, hidden=64), out)
        model = VL2Model(demo_config(variant, width=32, hidden=64))
        model.load_state_dict(load_model(out, dtype="float32", device="cpu").model.state_dict())
    proc = Processor.from_pretrained(out)
    batch, lens = make_batch(proc, "number", 2, random.Random(0))
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss = answer_loss(model, batch, lens)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_training_reads_first_then_does_every_task():
    from vl2edge.train_demo import PHASES, task_weights

    mixes = [task_weights(s, 1000) for s in range(1000)]
    assert set(mixes[0]) == {"number", "wide"} and set(mixes[-1]) == set(demo_tasks.TASKS)
    assert mixes.index(mixes[-1]) == round(PHASES[0][0] * 1000)


def test_a_mix_is_task_weights_and_bad_ones_are_usage_errors(small_processor):
    import argparse

    from vl2edge.train_demo import parse_mix, step_batch, task_weights

    mix = parse_mix("ground=0.6,number=0.4")
    assert mix == {"ground": 0.6, "number": 0.4} and task_weights(999, 1000, [(1.0, mix)]) == mix
    assert {step_batch(3, s, 8, 1, small_processor, [(1.0, {"count": 1.0})])[0] for s in range(8)} == {"count"}
    for bad in ("ground", "ground=", "grund=1", "ground=-1", "ground=0", "ground=nan", "ground=inf", "ground=1,,"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_mix(bad)


def test_training_goes_on_from_a_trained_model_and_keeps_its_history(small_model, tmp_path):
    import json

    from vl2edge.models.loading import load_model
    from vl2edge.train_demo import main

    _, model = small_model
    init = tmp_path / "init"
    _changed_copy(small_model, init, lambda i, p: p.mul_(1.0 + 0.001 * (i % 7 + 1)))  # weights no fresh init has
    (init / "training.json").write_text(json.dumps({"steps": 5, "variant": "mha", "patch": 32}))
    main(["--init", str(init), "--out", str(tmp_path / "next"), "--steps", "1", "--lr", "1e-12", "--eval", "1",
          "--mix", "ground=1"])
    report = json.loads((tmp_path / "next" / "training.json").read_text())
    assert report["init"] == {"steps": 5, "variant": "mha", "patch": 32}
    assert report["phases"] == [[1.0, {"ground": 1.0}]]
    assert report["variant"] == "mha" and not (tmp_path / "next.training").exists()  # state removed when done
    assert "checkpoint at step 1/1" in (tmp_path / "next" / "training.log").read_text()
    back = load_model(tmp_path / "next", dtype="float32", device="cpu").model.state_dict()
    for name, t in model.state_dict().items():  # lr ~0: the weights it started from, not the seed's
        assert torch.allclose(back[name], t, atol=1e-6), name


def _stop_at(step: int):
    """A log callback that stops training right after checkpoint `step` (as a kill would, a step later)."""
    def log(line: str) -> None:
        if line.startswith(f"checkpoint at step {step}/"):
            raise KeyboardInterrupt
    return log


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(small_model, tmp_path):
    from vl2edge.train_demo import Recipe, train
    from vl2edge.train_state import TrainingRun

    recipe = Recipe(steps=5, batch=2, lr=3e-3, seed=4, phases=[(0.4, {"number": 1.0}), (1.0, {"ground": 1.0})],
                    init=str(small_model[0]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads' reductions differ in the last bits from run to run; one's do not
    try:
        straight = TrainingRun(tmp_path / "straight")
        train(recipe, straight, checkpoint_s=1e9, probe=0, log=lambda s: None)
        stopped = TrainingRun(tmp_path / "stopped")
        with pytest.raises(KeyboardInterrupt):
            train(recipe, stopped, checkpoint_s=0, probe=0, log=_stop_at(2))
        assert stopped.stopped_at()["step"] == 2
        train(recipe, stopped, resume=True, checkpoint_s=0, probe=0, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    a, b = straight.load(), stopped.load()
    assert a["step"] == b["step"] == 5 and a["losses"] == b["losses"]
    moved = 0
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
        moved += not torch.equal(t, small_model[1].state_dict()[name])
    assert moved > 10  # the weights did train
    assert "resumed at step 2/5" in stopped.log_file.read_text()


def test_checkpoints_log_a_held_out_score(small_model, tmp_path):
    from vl2edge.train_demo import Recipe, train
    from vl2edge.train_state import TrainingRun

    run = TrainingRun(tmp_path / "run")
    train(Recipe(steps=2, batch=1, phases=[(1.0, {"count": 1.0})], init=str(small_model[0])), run,
          checkpoint_s=0, probe=1, log=lambda s: None)
    lines = [ln for ln in run.log_file.read_text().splitlines() if "checkpoint at step" in ln]
    assert len(lines) == 2 and all('held-out (1 a task): {"number": ' in ln for ln in lines)
    assert "step 2/2" in run.log_file.read_text()


def test_the_cli_refuses_what_it_cannot_resume(small_model, tmp_path, capsys, monkeypatch):
    from vl2edge.train_demo import main

    base = ["--init", str(small_model[0]), "--out", str(tmp_path / "m"), "--steps", "3", "--batch", "1",
            "--mix", "count=1", "--eval", "0", "--probe", "0", "--checkpoint-minutes", "0"]

    def refused(args, words):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and "Traceback" not in err, err

    refused(base + ["--resume"], "nothing to resume")
    state = tmp_path / "m.training"
    import vl2edge.train_demo as td
    real = td.step_batch

    def dies_at_step_2(seed, step, *rest):
        if step == 2:
            raise KeyboardInterrupt  # Ctrl-C in the third step: the last checkpoint is step 2's
        return real(seed, step, *rest)

    monkeypatch.setattr(td, "step_batch", dies_at_step_2)
    with pytest.raises(SystemExit) as e:
        main(base)
    monkeypatch.undo()
    assert e.value.code == 130 and "step 2 saved" in capsys.readouterr().err
    refused(base, "holds a stopped run (step 2 of 3)")
    refused(base[:-6] + ["--steps", "4"] + base[-6:] + ["--resume"], "--steps 3 (asked: 4)")
    main(base + ["--resume"])
    assert (tmp_path / "m" / "model.safetensors").is_file() and not state.exists()
    import json
    report = json.loads((tmp_path / "m" / "training.json").read_text())
    assert report["steps"] == 3 and "--resume" not in report["command"]


def test_a_torn_checkpoint_is_a_one_line_error(small_model, tmp_path, capsys):
    from vl2edge.train_demo import main

    state = tmp_path / "m.training"
    state.mkdir()
    (state / "state.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(SystemExit) as e:
        main(["--init", str(small_model[0]), "--out", str(tmp_path / "m"), "--steps", "2", "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a readable training checkpoint" in err and "Traceback" not in err


def test_grounding_pictures_hold_the_one_figure_named():
    for s in range(6):
        one = example("ground", random.Random(s))
        a = np.asarray(one.images[0]).astype(int)
        figure = [c for c in COLORS if (np.abs(a - COLORS[c]).sum(-1) == 0).sum() > 100]
        named = one.prompt.split("<|ref|>the ")[1].split()[0]
        assert len(figure) == 1 and figure[0] == named and score(one, one.answer)


def test_demo_pictures_hold_what_they_say(tmp_path):
    drawn = demo_tasks.demo_pictures(tmp_path, seed=11)
    number = Image.open(tmp_path / "number.png").convert("RGB")
    assert drawn["number"] == example("number", random.Random(11)).answer and _ink(number)[2] > 0
    shapes = np.asarray(Image.open(tmp_path / "shapes.png").convert("RGB")).astype(int)
    x1, y1, x2, y2 = drawn["box"]
    assert (np.abs(shapes[y1:y2, x1:x2] - COLORS["red"]).sum(-1) == 0).mean() > 0.99
