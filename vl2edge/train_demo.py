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

Status (2026-12-04): the mechanics are tested (tests/test_demo_tasks.py); no run has yet learned every
task, so nothing is shipped. What is known (numbers in bench/RESULTS.md, 2026-12-04): trained on
number pictures of the full-size distribution (24-60 px digits anywhere on a 256-384 px canvas) the
model sits on the plateau of the unconditional answer (loss ~2.05 per token) for 900+ steps, at patch
32 and 16, lr 5e-4..2e-3, two inits; the cause is the tower, which alone cannot learn one such digit
in 150 steps at patch 32 (`bench/vision_probe.py`). Trained on tight crops (`tight_share`), the same
model leaves the plateau near step 800 and reads 84 % of held-out tight crops after 2,400 steps
(patch 32, 760 s), but 0 % of full-size pictures. The curriculum below (tight crops falling to 20 % at
mid-run) was too fast in its one run: the loss had not left the plateau when the share reached its
floor. Widening the canvases gradually from the tight-crop model (1,800 steps) brought the full-size
loss to 1.44 per token but 0 % exact answers. Next: hold the share at 1 until the number loss leaves
the plateau (say < 1.0), then widen, at patch 16 (the probe learns twice as fast a step there).

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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import demo_tasks
from .config import VL2Config
from .presets import tiny
from .processor import Processor, ProcessorOutput

VARIANTS = ("mha", "mla-noaux")
# Tiles the demo model sees: one 384 tile, or two side by side / stacked (the wide task needs two).
RESOLUTIONS = [[384, 384], [768, 384], [384, 768]]
HELDOUT_SEED = 7_000_000_000_000  # held-out examples: seeds far from the training steps' (seed * 1_000_003 + step)
TASK_WEIGHTS = {"number": 0.45, "wide": 0.1, "ground": 0.35, "count": 0.1}
CURRICULUM, TIGHT_FLOOR = 0.5, 0.2  # tight number crops: all at step 0, down to 20 % from mid-run on


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


def make_batch(processor: Processor, task: str, rows: int, rng: random.Random, tight_share: float = 0.0):
    """A left-padded batch of one task, and the answer length of each row (answers end every row);
    about `tight_share` of number rows are tight crops (`demo_tasks.example(..., tight=True)`)."""
    drawn = [demo_tasks.example(task, rng, tight=tight_share > 0 and rng.random() < tight_share) for _ in range(rows)]
    encoded = [encode(processor, ex) for ex in drawn]
    return processor.collate([e for e, _ in encoded]), [n for _, n in encoded]


def tight_share(step: int, steps: int) -> float:
    """The curriculum: every number picture a tight crop at first, falling linearly to TIGHT_FLOOR at
    CURRICULUM of the run (a tower that never saw big digits stays on the plateau: bench/vision_probe.py)."""
    return max(TIGHT_FLOOR, 1.0 - step / (CURRICULUM * steps))


def step_batch(seed: int, step: int, steps: int, rows: int, processor: Processor):
    """Step `step`'s task and batch: a function of (seed, step, steps) alone, wherever it is made."""
    rng = random.Random(seed * 1_000_003 + step)
    task = rng.choices(list(TASK_WEIGHTS), list(TASK_WEIGHTS.values()))[0]
    return task, *make_batch(processor, task, rows, rng, tight_share(step, steps))


def answer_loss(model, batch: ProcessorOutput, answer_lens: list[int]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (+eos) given everything before them."""
    from .export.graphs import GraphCache  # zero-length pasts: the cache that concatenates (autograd-safe)

    ids = torch.from_numpy(batch.input_ids)
    B, T = ids.shape
    embeds = model.language.embed(ids)                                              # [B, T, D]
    feats = model.image_features(batch.images, batch.images_spatial_crop)
    seq = torch.from_numpy(batch.images_seq_mask)
    if any(f.shape[0] for f in feats):
        embeds = embeds.masked_scatter(seq[..., None], torch.cat(feats).to(embeds.dtype))
    c = model.config.language_config
    if c.use_mla:
        pasts = [torch.zeros(B, 0, c.kv_lora_rank + c.qk_rope_head_dim)] * c.num_hidden_layers
    else:
        pasts = [torch.zeros(B, c.num_key_value_heads, 0, c.head_dim)] * (2 * c.num_hidden_layers)
    logits = model.language(embeds, GraphCache(pasts), torch.from_numpy(batch.attention_mask))  # [B, T, V]
    target = torch.full((B, T), -100, dtype=torch.long)
    for b, n in enumerate(answer_lens):
        target[b, T - n:] = ids[b, T - n:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1))


# -- evaluation --------------------------------------------------------------------------------------

def accuracy(pipe, seed: int, per_task: int, tasks=demo_tasks.TASKS) -> dict[str, float]:
    """Share of right answers per task on `per_task` held-out examples drawn from `seed` (greedy)."""
    rng = random.Random(seed)
    out = {}
    for task in tasks:
        right = 0
        for _ in range(per_task):
            ex = demo_tasks.example(task, rng)
            answer = pipe.chat([{"role": "user", "content": ex.prompt}], list(ex.images), max_new_tokens=40).text
            right += demo_tasks.score(ex, answer)
        out[task] = right / per_task
    return out


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


def train(variant: str, out: Path, steps: int, seed: int, batch: int, lr: float, width: int = 128, hidden: int = 128,
          patch: int = 32, bf16: bool = True, log=print) -> dict:
    """Train from the seeded init for `steps` batches; weights written over `out`'s. bf16: autocast the
    forward pass (AMX matmuls; master weights and optimizer state stay float32)."""
    from .models.loading import load_model
    from .models.model import VL2Model
    from .synthetic import write_model

    torch.manual_seed(seed)
    config = demo_config(variant, width, hidden, patch)
    write_model(config, out, seed=seed)
    model = VL2Model(config)  # owns its memory: the loaded one maps the file that is rewritten at the end
    model.load_state_dict(load_model(out, dtype="float32", device="cpu").model.state_dict())
    model.requires_grad_(True)
    frozen = ("e_score_correction_bias",)  # noaux_tc's balancing bias is not learned by gradient
    params = [p for n, p in model.named_parameters() if not n.endswith(frozen)]
    for n, p in model.named_parameters():
        if n.endswith(frozen):
            p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    processor = Processor.from_pretrained(out)
    t0 = time.perf_counter()
    losses: dict[str, list[float]] = {t: [] for t in TASK_WEIGHTS}
    for step in range(steps):  # rendering in a second process was slower: it stalls torch's two threads
        task, b, lens = step_batch(seed, step, steps, batch, processor)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = answer_loss(model, b, lens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses[task].append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            recent = {t: round(float(np.mean(v[-10:])), 3) for t, v in losses.items() if v}
            log(f"step {step + 1}/{steps}  {time.perf_counter() - t0:.0f}s  lr {sched.get_last_lr()[0]:.2e}  {recent}")
    save_weights(model, out)
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": {t: round(float(np.mean(v[-20:])), 4) for t, v in losses.items() if v}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vl2edge.train_demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="mha", choices=VARIANTS)
    ap.add_argument("--out", required=True, type=Path, help="model directory to write (replaced)")
    ap.add_argument("--steps", type=int, default=2800)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patch", type=int, default=32, help="vision patch size in px (384/patch patches a tile side)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="train the forward pass in float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--eval", type=int, default=100, metavar="N", help="held-out examples per task scored at the end")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    partial = a.out.with_name(a.out.name + ".partial")  # the old model stays until the new one is whole
    shutil.rmtree(partial, ignore_errors=True)
    report = train(a.variant, partial, a.steps, a.seed, a.batch, a.lr, patch=a.patch, bf16=a.bf16,
                   log=lambda s: print(s, flush=True))
    from .pipeline import load

    report["heldout_seed"] = HELDOUT_SEED + a.seed
    pipe = load(partial, device="cpu", dtype="float32", backend="torch")
    report["heldout_accuracy"] = accuracy(pipe, HELDOUT_SEED + a.seed, a.eval)
    report |= {"variant": a.variant, "seed": a.seed, "batch": a.batch, "lr": a.lr, "patch": a.patch, "bf16": a.bf16,
               "command": "python -m vl2edge.train_demo " + " ".join(sys.argv[1:] if argv is None else argv)}
    (partial / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(a.out, ignore_errors=True)
    partial.rename(a.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
