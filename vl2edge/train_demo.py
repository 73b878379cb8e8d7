"""Train the demo model: a test-size DeepSeek-VL2 that reads numbers and points at shapes, on the CPU.

    python -m vl2edge.train_demo --variant mha --out models/trained-tiny
    python -m vl2edge.train_demo --variant mla-noaux --out models/trained-tiny-mla

The model is the real architecture (SigLIP-style tower, 2x2 projector, global view + local tiles,
DeepSeekMoE with routed and shared experts; MHA like Tiny or MLA with sigmoid/noaux_tc routing like
Base), shrunk (`demo_config`), trained from a seeded random init on the rendered tasks of
`vl2edge.demo_tasks` with the project's own tokenizer and processor, so training sees exactly the
token layout inference sees. The directory is written in the official layout (a random-weight model
via `vl2edge.synthetic`, then its weights replaced by the trained ones) with `training.json`: the
command, seed, steps, time and the held-out accuracy measured at the end.

Runs survive a session: a checkpoint (weights, optimizer and schedule state, torch's RNG, the step,
the losses; vl2edge/train_state.py) goes to OUT.training every `--checkpoint-minutes` (5) and at the
end, each with a small held-out score in OUT.training/train.log; the same command with `--resume` goes on
from the last one (the batches are a function of the recipe and the step, so it draws what the
uninterrupted run would have; on one thread the weights are bit for bit those of an uninterrupted run).
`--init DIR --mix TASK=W,...` goes on training a trained model on one task mix: `make train-demo` is the
reading-first run (PHASES) followed by a round weighted to grounding; the shipped model's record,
training.json, holds both stages' commands, times and held-out scores (bench/RESULTS.md, 2026-12-07).

Loss: cross-entropy over the answer tokens and the closing eos only. Batches hold one task each (rows
of one task have similar lengths, so left-padding wastes little).

Dimension legend: B batch rows, T tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import demo_tasks
from .config import VL2Config
from .errors import InputError, VL2Error
from .outputs import OutputDir
from .presets import tiny
from .processor import Processor, ProcessorOutput
from .train_state import TrainingRun, recipe_differences

VARIANTS = ("mha", "mla-noaux")
# Tiles the demo model sees: one 384 tile, or two side by side / stacked (the wide task needs two).
RESOLUTIONS = [[384, 384], [768, 384], [384, 768]]
# Which task a batch holds, by phase: reading first (the slowest to learn: the number loss sits on the
# plateau of the unconditional answer for ~800 number batches before it falls), then every task. (A
# middle phase of one-figure grounding, "ground-one", learned no grounding in the mixed run: RESULTS.)
PHASES = [(0.35, {"number": 0.8, "wide": 0.2}),
          (1.0, {"number": 0.35, "wide": 0.15, "ground": 0.35, "count": 0.15})]


def demo_config(variant: str, width: int = 128, hidden: int = 128, patch: int = 32) -> VL2Config:
    """`presets.tiny(variant)` with `patch`-px patches (32: 6x6 merged tokens a tile; 16: 12x12, near the
    real model's 14x14, at 2-3x the cost a step), a wider tower and LM, 2-tile layouts."""
    d = tiny(variant).to_dict()
    d["candidate_resolutions"] = RESOLUTIONS
    d["vision_config"] |= {"patch_size": patch, "width": width, "layers": 3, "heads": 4}
    d["projector_config"] |= {"input_dim": width, "n_embed": hidden}
    d["language_config"] |= {"hidden_size": hidden, "intermediate_size": 3 * hidden}
    return VL2Config.from_dict(d)


# -- batches -----------------------------------------------------------------------------------------

def encode(processor: Processor, ex: demo_tasks.Example) -> tuple[ProcessorOutput, int]:
    """The example as the processor lays it out, answer and eos appended; and the answer's token count."""
    out = processor([{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}],
                    list(ex.images))
    eos = np.asarray([[processor.eos_id]])
    answer = len(processor.encode(ex.answer)) + 1
    return ProcessorOutput(np.concatenate([out.input_ids, eos], 1), np.concatenate([out.attention_mask, eos > -1], 1),
                           out.images, np.concatenate([out.images_seq_mask, eos < 0], 1), out.images_spatial_crop,
                           out.image_sizes, out.num_image_tokens), answer


def make_batch(processor: Processor, task: str, rows: int, rng: random.Random):
    """A left-padded batch of one task, and the answer length of each row (answers end every row)."""
    drawn = [demo_tasks.example(task, rng) for _ in range(rows)]
    encoded = [encode(processor, ex) for ex in drawn]
    return processor.collate([e for e, _ in encoded]), [n for _, n in encoded]


Phases = list[tuple[float, dict[str, float]]]  # (end as a share of the steps, task weights), in order


def task_weights(step: int, steps: int, phases: Phases = PHASES) -> dict[str, float]:
    """The task mix of step `step` of `steps`."""
    return next(w for end, w in phases if step < end * steps or end >= 1.0)


def step_batch(seed: int, step: int, steps: int, rows: int, processor: Processor, phases: Phases = PHASES):
    """Step `step`'s task and batch: a function of (seed, step, steps, phases) alone, wherever it is made."""
    rng = random.Random(seed * 1_000_003 + step)
    weights = task_weights(step, steps, phases)
    task = rng.choices(list(weights), list(weights.values()))[0]
    return task, *make_batch(processor, task, rows, rng)


def answer_loss(model, batch: ProcessorOutput, answer_lens: list[int]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (+eos) given everything before them."""
    from .export.graphs import GraphCache, zero_pasts  # the cache that concatenates (autograd-safe)

    ids = torch.from_numpy(batch.input_ids)
    B, T = ids.shape
    embeds = model.language.embed(ids)                                              # [B, T, D]
    feats = model.image_features(batch.images, batch.images_spatial_crop)
    seq = torch.from_numpy(batch.images_seq_mask)
    if any(f.shape[0] for f in feats):
        embeds = embeds.masked_scatter(seq[..., None], torch.cat(feats).to(embeds.dtype))
    cache = GraphCache(zero_pasts(model.config.language_config, B, 0))
    logits = model.language(embeds, cache, torch.from_numpy(batch.attention_mask))   # [B, T, V]
    target = torch.full((B, T), -100, dtype=torch.long)
    for b, n in enumerate(answer_lens):
        target[b, T - n:] = ids[b, T - n:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1))


# -- writing -----------------------------------------------------------------------------------------

def save_weights(model, out: Path) -> None:
    """The model's float32 tensors under their checkpoint names (over the directory's random ones)."""
    from .models.loading import sanitize
    from .weights import write_checkpoint

    state = model.state_dict()
    shapes = model.config.tensor_shapes()

    def chunks():
        for name, shape in shapes.items():
            where = sanitize(name)
            if where is None:  # saved by the official code, never run (the vision attn_pool head)
                yield name, np.zeros(shape, np.float32)
                continue
            t = state[where[0]] if where[1] is None else state[where[0]][where[1]]
            yield name, t.detach().float().contiguous().numpy()

    write_checkpoint(out, {k: ("F32", s) for k, s in shapes.items()}, chunks(), metadata={"format": "pt"})


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a run's weights; a resumed run must ask for the same."""

    variant: str = "mha"
    steps: int = 4000
    seed: int = 0
    batch: int = 8
    lr: float = 1e-3
    patch: int = 32
    bf16: bool = False
    phases: Phases = field(default_factory=lambda: PHASES)
    init: str | None = None  # a trained demo model this run goes on from (its architecture, not variant/patch)

    def to_dict(self) -> dict:
        """Plain JSON values (phases as lists), as the checkpoint stores them."""
        return json.loads(json.dumps(asdict(self)))


def _copy_model(src: Path, dst: Path) -> None:
    """The model files of a trained demo model (not its training record) into `dst`."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("training.json", "training.log"):
            shutil.copy2(f, dst / f.name)


def train(recipe: Recipe, run: TrainingRun, resume: bool = False, checkpoint_s: float = 300.0, probe: int = 20,
          log=print) -> dict:
    """Train `recipe` in `run`'s directory, from its last checkpoint when `resume`. A checkpoint every
    `checkpoint_s` seconds and at the end; each scores `probe` held-out examples a task into the log.
    bf16: autocast the forward pass (master weights and optimizer state stay float32)."""
    from .demo_eval import run as score
    from .models.loading import load_model
    from .models.model import VL2Model
    from .synthetic import write_model

    def say(line: str) -> None:
        run.log(line)
        log(line)

    state = run.load() if resume else None
    if state is None:
        run.start()
        torch.manual_seed(recipe.seed)
        if recipe.init is None:
            write_model(demo_config(recipe.variant, patch=recipe.patch), run.model_dir, seed=recipe.seed)
        else:
            _copy_model(Path(recipe.init), run.model_dir)
    model = VL2Model(VL2Config.from_pretrained(run.model_dir))  # owns its memory (the file is rewritten)
    model.load_state_dict(state["model"] if state else
                          load_model(run.model_dir, dtype="float32", device="cpu").model.state_dict())
    frozen = ("e_score_correction_bias",)  # noaux_tc's balancing bias is not learned by gradient
    for n, p in model.named_parameters():
        p.requires_grad_(not n.endswith(frozen))
    params = [p for p in model.parameters() if p.requires_grad]
    steps = recipe.steps
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    start, seconds = 0, 0.0
    losses: dict[str, list[float]] = {t: [] for _, w in recipe.phases for t in w}
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        start, seconds, losses = state["step"], state["seconds"], state["losses"]
        say(f"resumed at step {start}/{steps} ({seconds:.0f} s trained before)")
    processor = Processor.from_pretrained(run.model_dir)

    def checkpoint(step: int) -> None:
        save_weights(model, run.model_dir)
        rng = torch.get_rng_state()
        run.save({"step": step, "recipe": recipe.to_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                  "schedule": sched.state_dict(), "rng": rng, "losses": losses, "seconds": seconds})
        line = f"checkpoint at step {step}/{steps}"
        if probe:
            acc = score(run.model_dir, ["torch-fp32"], probe, log=lambda s: None)["torch-fp32"]["accuracy"]
            line += f"  held-out ({probe} a task): " + json.dumps(acc)
            torch.set_rng_state(rng)  # the probe leaves the run as it found it
        say(line)

    t0 = last = time.perf_counter()
    for step in range(start, steps):  # rendering in a second process was slower: it stalls torch's two threads
        task, b, lens = step_batch(recipe.seed, step, steps, recipe.batch, processor, recipe.phases)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            loss = answer_loss(model, b, lens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses[task].append(loss.item())
        now = time.perf_counter()
        seconds, t0 = seconds + now - t0, now
        if (step + 1) % 50 == 0 or step + 1 == steps:
            recent = {t: round(float(np.mean(v[-10:])), 3) for t, v in losses.items() if v}
            say(f"step {step + 1}/{steps}  {seconds:.0f}s  lr {sched.get_last_lr()[0]:.2e}  {recent}")
        if step + 1 == steps or now - last >= checkpoint_s:
            checkpoint(step + 1)
            t0 = last = time.perf_counter()  # the checkpoint's own time is not training time
    return {"steps": steps, "seconds": round(seconds, 1),
            "final_loss": {t: round(float(np.mean(v[-20:])), 4) for t, v in losses.items() if v}}


def parse_mix(text: str) -> dict[str, float]:
    """"ground=0.6,number=0.4" -> {"ground": 0.6, "number": 0.4} (argparse type: bad text is a usage error)."""
    mix = {}
    for part in text.split(","):
        task, _, weight = part.partition("=")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if task not in demo_tasks.TASKS or not (w > 0 and math.isfinite(w)):
            raise argparse.ArgumentTypeError(f"{part!r}: want TASK=WEIGHT, TASK one of {', '.join(demo_tasks.TASKS)}, "
                                             "WEIGHT a positive number")
        mix[task] = w
    return mix


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vl2edge.train_demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="mha", choices=VARIANTS)
    ap.add_argument("--out", required=True, type=Path, help="model directory to write (when training ends)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patch", type=int, default=32, help="vision patch size in px (384/patch patches a tile side)")
    ap.add_argument("--bf16", action="store_true", help="autocast the forward pass to bfloat16 (here 2x slower a step)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--eval", type=int, default=100, metavar="N", help="held-out examples per task scored at the end")
    ap.add_argument("--init", type=Path, default=None, metavar="DIR",
                    help="go on training this trained demo model (its architecture) instead of a fresh init")
    ap.add_argument("--mix", type=parse_mix, default=None, metavar="TASK=W,...",
                    help="one task mix for every step (default: the reading-first PHASES)")
    ap.add_argument("--state", type=Path, default=None, metavar="DIR",
                    help="where checkpoints and train.log are kept while training (default: OUT.training)")
    ap.add_argument("--resume", action="store_true", help="go on from the last checkpoint in --state (same arguments)")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0, help="minutes between checkpoints (default 5)")
    ap.add_argument("--probe", type=int, default=20, metavar="N",
                    help="held-out examples per task scored at each checkpoint, into the log (0: none)")
    a = ap.parse_args(argv)
    bad = [f"--{k.replace('_', '-')} {getattr(a, k)} must be {want}" for k, want, ok in (
        ("steps", "at least 1", a.steps >= 1), ("batch", "in [1, 1024]", 1 <= a.batch <= 1024),
        ("lr", "a positive finite number", math.isfinite(a.lr) and a.lr > 0),
        ("patch", "a divisor of 384 from 8 to 64", 8 <= a.patch <= 64 and 384 % a.patch == 0),
        ("eval", "in [0, 10000]", 0 <= a.eval <= 10000), ("probe", "in [0, 1000]", 0 <= a.probe <= 1000),
        ("checkpoint_minutes", "a number from 0 to 1440", 0 <= a.checkpoint_minutes <= 1440),
        ("threads", "at least 1", a.threads is None or a.threads >= 1)) if not ok]
    if bad:
        ap.error("; ".join(bad))
    if a.init is not None and not (a.init / "config.json").is_file():
        ap.error(f"--init {a.init}: not a model directory (no config.json)")
    if a.threads:
        torch.set_num_threads(a.threads)
    recipe = Recipe(a.variant, a.steps, a.seed, a.batch, a.lr, a.patch, a.bf16,
                    PHASES if a.mix is None else [(1.0, a.mix)], None if a.init is None else str(a.init.resolve()))
    run = TrainingRun(a.state or a.out.with_name(a.out.name + ".training"))
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # refused before training: a folder that holds files (without --overwrite), a file, a link
        output = OutputDir(a.out, a.overwrite)
        _check_resume(run, recipe, a.resume)
        report = train(recipe, run, a.resume, 60 * a.checkpoint_minutes, a.probe, log=lambda s: print(s, flush=True))
        _finish(a, recipe, run, report, [x for x in argv if x != "--resume"])
        with output as partial:  # the old model stays until the new one is whole
            for f in run.model_dir.iterdir():
                shutil.copy2(f, partial / f.name)
        shutil.rmtree(run.where, ignore_errors=True)
    except VL2Error as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        stopped = run.stopped_at()
        where = f"step {stopped['step']}" if stopped else "no checkpoint yet"
        print(f"stopped ({where} saved in {run.where}); go on with the same command and --resume", file=sys.stderr)
        raise SystemExit(130) from None


def _check_resume(run: TrainingRun, recipe: Recipe, resume: bool) -> None:
    """Refuses a resume with nothing to resume or another recipe, and a fresh start over a stopped run."""
    stopped = run.stopped_at()
    if resume and stopped is None:
        raise InputError(f"nothing to resume: {run.where} holds no training checkpoint")
    if resume and stopped is not None:
        changed = recipe_differences(stopped["recipe"], recipe.to_dict())
        if changed:
            raise InputError("--resume asks for another run than the stopped one: it was started with "
                             + "; ".join(changed))
        if stopped["step"] >= stopped["steps"]:
            raise InputError(f"{run.where} holds a finished run; remove it to start again")
    elif stopped is not None:
        raise InputError(f"{run.where} holds a stopped run (step {stopped['step']} of {stopped['steps']}): "
                         "pass --resume to go on, or remove it to start again")


def _finish(a, recipe: Recipe, run: TrainingRun, report: dict, argv: list[str]) -> None:
    """The held-out score and the record (training.json, training.log) in the trained model's directory."""
    from .demo_eval import HELDOUT_SEED
    from .demo_eval import run as score

    history = None
    if a.init is not None and (a.init / "training.json").is_file():
        history = json.loads((a.init / "training.json").read_text())
    report["heldout"] = {"seed": HELDOUT_SEED, "per_task": a.eval, "accuracy":
                         score(run.model_dir, ["torch-fp32"], a.eval)["torch-fp32"]["accuracy"] if a.eval else None}
    arch = {"variant": a.variant, "patch": a.patch} if a.init is None else \
        {k: (history or {}).get(k) for k in ("variant", "patch")}
    report |= {"phases": recipe.phases, **arch, "seed": a.seed, "batch": a.batch, "lr": a.lr, "bf16": a.bf16,
               "machine": _machine(), "command": "python -m vl2edge.train_demo " + " ".join(argv)}
    if a.init is not None:
        report["init"] = history  # the run this one went on from, with its own history
    (run.model_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.copy2(run.log_file, run.model_dir / "training.log")
    print(json.dumps({k: v for k, v in report.items() if k != "init"}, indent=2))


def _machine() -> str:
    """The CPU model and core count, for the record."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
