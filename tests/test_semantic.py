"""The semantic suite (vl2edge/demo_eval.py): the shipped demo models answer held-out tasks right.

Checked here: the suite's mechanics (held-out examples fixed by the seed, scoring, the CLI's refusals);
that its batched and offloaded paths answer exactly as the plain torch model (a random-weight demo
model: exact equality needs no trained weights); and the accuracy of the shipped demo models
(models/trained-tiny*): a fast sample in the default run, the whole suite (every path, 100 held-out
examples a task) under the `slow` marker. Thresholds: torch float32 at the shipped model's scores (FLOOR,
with issue 32's targets beside them); every other path within 2 points of it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vl2edge import demo_eval, demo_tasks

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


# -- mechanics -------------------------------------------------------------------------------------------

def test_heldout_examples_are_fixed_by_the_seed_and_independent_of_the_other_tasks():
    a = demo_eval.heldout(5, 3)
    b = demo_eval.heldout(5, 3, tasks=("ground",))
    assert [e.task for e in a] == [t for t in demo_tasks.TASKS for _ in range(3)]
    assert [e.answer for e in a if e.task == "ground"] == [e.answer for e in b]
    assert [e.answer for e in demo_eval.heldout(6, 3)] != [e.answer for e in a]


def test_accuracy_counts_right_and_wrong_answers_per_task():
    examples = demo_eval.heldout(1, 4, tasks=("number", "ground"))
    said = [ex.answer for ex in examples]
    said[0], said[5] = said[0] + "0", "<|det|>[[0, 0, 1, 1]]<|/det|>"  # one wrong number, one box far off
    assert demo_eval.accuracy(examples, said) == {"number": 0.75, "ground": 0.75}


def test_the_cli_refuses_an_unknown_path_and_a_missing_model(tmp_path):
    for args, words in ((["--paths", "torch-fp32,warp-drive"], "unknown path"),
                        (["--model", str(tmp_path / "nope"), "--paths", "torch-fp32"], "nope")):
        r = subprocess.run([sys.executable, "-m", "vl2edge.demo_eval", *args, "--per-task", "1"],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- the suite's paths on a model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    from vl2edge.synthetic import write_model
    from vl2edge.train_demo import demo_config

    out = tmp_path_factory.mktemp("semantic")
    write_model(demo_config("mha", width=32, hidden=64), out, seed=3)
    return out


def test_the_batched_path_answers_exactly_as_the_single_one(random_model):
    results = demo_eval.run(random_model, ["torch-fp32", "batched"], 3, log=lambda s: None)
    single, batched = results["torch-fp32"]["answers"], results["batched"]["answers"]
    assert len(single) == 3 * len(demo_tasks.TASKS) and len(set(single)) > 1  # answers differ between pictures
    assert batched == single
    assert results["batched"]["same_as_fp32"] == {t: 1.0 for t in demo_tasks.TASKS}


def test_the_table_gives_accuracy_and_agreement_with_float32():
    results = {"torch-fp32": {"accuracy": {"number": 1.0, "ground": 0.5}, "seconds": 2.0,
                              "same_as_fp32": {"number": 1.0, "ground": 1.0}},
               "int4": {"accuracy": {"number": 0.9, "ground": 0.45}, "seconds": 1.5,
                        "same_as_fp32": {"number": 0.8, "ground": 0.25}}}
    lines = demo_eval.table(results).splitlines()
    assert lines[0] == "| path | number | ground | same answer as fp32 (number / ground) | s |"
    assert lines[2] == "| torch-fp32 | 100% | 50% | - | 2.0 |" and lines[3] == "| int4 | 90% | 45% | 80% / 25% | 1.5 |"


def test_the_offloaded_path_keeps_a_quarter_of_the_experts_and_answers_as_resident(random_model, tmp_path):
    from vl2edge.models.offload import offload_stats

    pipe, _ = demo_eval.open_path(random_model, "offload-25", tmp_path)
    examples = demo_eval.heldout(demo_eval.HELDOUT_SEED, 2)
    said = demo_eval.answers(pipe, examples)
    stats = offload_stats(pipe.backend)
    assert stats["misses"] > 0  # experts really were swapped in and out
    ref = demo_eval.run(random_model, ["torch-fp32"], 2, log=lambda s: None)["torch-fp32"]["answers"]
    assert said == ref


# -- the shipped demo models -----------------------------------------------------------------------------

SHIPPED = ("trained-tiny",)
# Issue 32's targets are number 95 %, ground 90 %, count 95 %; the shipped model scored 96 / 95 / 95 on the 100
# held-out examples a task (training.json). The floors are those scores less one answer (another CPU may round a
# box differently); wide is reported, not judged.
FLOOR = {"number": 0.95, "ground": 0.94, "count": 0.94}
JUDGED = tuple(FLOOR)
FAST_SAMPLE = 20                      # held-out examples a task in the default run: the first 20 of the 100
FAST_FLOOR = {"number": 0.85, "ground": 0.90, "count": 0.90}  # measured 90 / 95 / 100 %, less one answer


def _cpu_default_path() -> str:
    """The suite's path for what `vl2edge run` does with a float checkpoint on this CPU: int4-experts on
    ONNX Runtime, the int8 vision graph where u8s8 is exact (VNNI, AMX, non-x86), the float one elsewhere."""
    from vl2edge.cpu_features import u8s8_exact

    return "onnx-int4-experts-int8-vision" if u8s8_exact() else "onnx-int4-experts"


def _check_floor(accuracy: dict, where: str, floors: dict = FLOOR) -> None:
    for task, floor in floors.items():
        assert accuracy[task] >= floor - 1e-9, f"{where}: {task} {accuracy[task]:.0%} < {floor:.0%}"


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_demo_model_reads_counts_and_points_on_a_held_out_sample(name):
    """torch float32 and the CPU default, 20 held-out examples a task."""
    default = _cpu_default_path()
    results = demo_eval.run(ROOT / "models" / name, ["torch-fp32", default], FAST_SAMPLE, tasks=JUDGED,
                            log=lambda s: None)
    fp32 = results["torch-fp32"]["accuracy"]
    _check_floor(fp32, f"{name} torch-fp32", FAST_FLOOR)
    for task in JUDGED:  # one answer in 20 of slack: the 2-point rule is the whole suite's
        assert results[default]["accuracy"][task] >= fp32[task] - 1 / FAST_SAMPLE, (task, results[default], fp32)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_demo_model_passes_the_whole_semantic_suite(name):
    """Every path, the held-out examples training.json scored; float32's score is the one it recorded."""
    import json

    model = ROOT / "models" / name
    trained = json.loads((model / "training.json").read_text())
    results = demo_eval.run(model, demo_eval.PATHS, trained["heldout"]["per_task"], seed=trained["heldout"]["seed"])
    fp32 = results["torch-fp32"]["accuracy"]
    assert fp32 == pytest.approx(trained["heldout"]["accuracy"], abs=0.011)  # the recorded run's weights
    _check_floor(fp32, f"{name} torch-fp32")
    for path, r in results.items():
        for task in JUDGED:
            assert r["accuracy"][task] >= fp32[task] - 0.02, (path, task, r["accuracy"], fp32)
