"""A demo training run's state directory: what survives a killed run, and what `--resume` reads back.

    <out>.training/
        model/          the model directory being trained (config, tokenizer, weights of the last checkpoint)
        state.pt        weights, optimizer and schedule state, torch RNG, step, losses, seconds, the recipe
        train.log       one line per 50 steps (losses) and per checkpoint (a small held-out score)

`state.pt` is written to a temporary name and renamed, so a kill mid-write leaves the checkpoint
before it whole. The data stream needs no state of its own: step `s`'s batch is a function of the
recipe and `s` (`train_demo.step_batch`), so a resumed run draws exactly the batches the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from .errors import InputError
from .outputs import os_reason

STATE = "state.pt"
LOG = "train.log"
MODEL = "model"


class TrainingRun:
    """The state directory of one training run (`where`), fresh or stopped."""

    def __init__(self, where: Path):
        self.where = Path(where)
        self.model_dir = self.where / MODEL
        self.state_file = self.where / STATE
        self.log_file = self.where / LOG

    def stopped_at(self) -> dict | None:
        """The last checkpoint's {step, steps, recipe}, or None when there is none."""
        if not self.state_file.is_file():
            return None
        state = self.load()
        return {"step": state["step"], "steps": state["recipe"]["steps"], "recipe": state["recipe"]}

    def start(self) -> None:
        """An empty state directory (a stopped run there is replaced: the caller has asked)."""
        try:
            if self.where.is_symlink() or (self.where.exists() and not self.where.is_dir()):
                raise InputError(f"cannot train into {self.where}: it is not a directory")
            shutil.rmtree(self.where, ignore_errors=True)
            self.where.mkdir(parents=True)
        except OSError as e:
            raise InputError(f"cannot write {self.where}: {os_reason(e)}") from None

    def log(self, line: str) -> None:
        """Append a timestamped line to train.log."""
        with open(self.log_file, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}\n")

    def save(self, state: dict) -> None:
        """The checkpoint, whole or not at all (temporary file, then rename)."""
        tmp = self.where / f".{STATE}.{os.getpid()}"
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.state_file)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise InputError(f"cannot save the training checkpoint in {self.where}: {os_reason(e)} "
                             "(the one before it is kept)") from None

    def load(self) -> dict:
        """The last checkpoint (a torn or foreign file is a one-line error)."""
        try:
            state = torch.load(self.state_file, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several kinds for a file that is not its checkpoint
            raise InputError(f"{self.state_file} is not a readable training checkpoint "
                             f"({type(e).__name__}); remove {self.where} to start again") from None
        if not isinstance(state, dict) or not {"step", "recipe", "model", "optimizer", "schedule"} <= set(state):
            raise InputError(f"{self.state_file} is not a training checkpoint of this version; "
                             f"remove {self.where} to start again")
        return state


def recipe_differences(stored: dict, asked: dict) -> list[str]:
    """What `asked` changes of the stopped run's recipe, as "--name stored (asked: value)"."""
    return [f"--{k.replace('_', '-')} {stored.get(k)!r} (asked: {asked.get(k)!r})"
            for k in sorted(set(stored) | set(asked)) if stored.get(k) != asked.get(k)]
