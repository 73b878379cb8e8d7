"""How fast the demo model's vision tower alone learns to see a digit: a probe for choosing its config.

    python bench/vision_probe.py --patch 16 --steps 150
    python bench/vision_probe.py --patch 32 --steps 150 --tight

The tower and projector of `train_demo.demo_config` (seeded random init, as the trainer starts), then
max-pooling over the image tokens of the processor's layout and a linear 10-way head, trained on one
rendered digit a picture ("7" black on white, Pillow's default font) at random places. A tower that cannot
learn this cannot learn to read 3-5 digit numbers end to end: this isolates the vision side from the
language model's attention. --tight crops the canvas to the digit plus a margin (the processor then
scales it up to fill the tile). Prints the training loss and accuracy every 25 steps and seconds a step.

Dimension legend: B pictures, N image tokens of one picture, D hidden.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vl2edge import demo_tasks
from vl2edge.train_demo import demo_config, encode


def digit_example(rng: random.Random, font: int, tight: bool) -> tuple[demo_tasks.Example, int]:
    value = rng.randrange(10)
    canvas = (rng.randint(font, 2 * font), rng.randint(font + 16, 2 * font + 16)) if tight else (384, 384)
    img = demo_tasks.number_image(value, font, rng, canvas=canvas)
    return demo_tasks.Example("number", (img,), f"<image>\n{demo_tasks.NUMBER_PROMPT}", str(value)), value


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--font", type=int, default=60, help="font size in px")
    ap.add_argument("--tight", action="store_true", help="canvas just around the digit")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args(argv)

    from vl2edge.models.loading import load_model
    from vl2edge.models.model import VL2Model
    from vl2edge.processor import Processor
    from vl2edge.synthetic import write_model

    torch.manual_seed(0)
    config = demo_config("mha", width=a.width, patch=a.patch)
    with tempfile.TemporaryDirectory() as tmp:
        write_model(config, Path(tmp), seed=0)
        model = VL2Model(config)
        model.load_state_dict(load_model(tmp, dtype="float32", device="cpu").model.state_dict())
        processor = Processor.from_pretrained(tmp)
    model.requires_grad_(True)
    head = torch.nn.Linear(config.language_config.hidden_size, 10)
    params = [*model.vision.parameters(), *model.projector.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    rng = random.Random(1)
    losses, right, t0 = [], [], time.perf_counter()
    for step in range(a.steps):
        drawn = [digit_example(rng, a.font, a.tight) for _ in range(a.batch)]
        batch = processor.collate([encode(processor, ex)[0] for ex, _ in drawn])
        labels = torch.tensor([v for _, v in drawn])
        feats = model.image_features(batch.images, batch.images_spatial_crop)   # B x [N, D]
        logits = head(torch.stack([f.max(0).values for f in feats]))            # [B, 10]
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        right.append((logits.argmax(1) == labels).float().mean().item())
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}  {(time.perf_counter() - t0) / (step + 1):.2f} s/step  "
                  f"loss {np.mean(losses[-25:]):.3f}  accuracy {np.mean(right[-25:]):.2f}", flush=True)


if __name__ == "__main__":
    main()
