"""Random-weight DeepSeek-VL2 checkpoints in the official layout, for tests, the demo and benchmarks.

`write_model(config, out)` writes config.json, processor_config.json, a small byte-level BPE
tokenizer that holds the official special tokens, and seeded random weights for every tensor
`config.tensor_shapes()` names, streamed to disk chunk by chunk (the full 27.5B Base stays far under
4 GB of RAM). Large checkpoints are sharded like the official repos. No torch needed.

    python -m vl2edge.synthetic --preset test-mha --out models/demo-tiny
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .config import VL2Config
from .presets import PRESETS, preset
from .weights import STORAGE, f32_to_bf16, write_checkpoint

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE = "<image>"
GROUNDING = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"]
CHAT = ["<|User|>", "<|Assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, IMAGE, *GROUNDING, *CHAT]  # ids 0..10, bos 0 and eos 1 as in Tiny/Base

PROCESSOR_CONFIG = {
    "add_special_token": False, "downsample_ratio": 2, "ignore_id": -100,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_token": IMAGE, "mask_prompt": False,
    "normalize": True, "pad_token": PAD, "patch_size": 14, "processor_class": "DeepseekVLV2Processor",
    "sft_format": "deepseek",
}

# Training text for the demo tokenizer: enough English for a few hundred merges.
_TEXT = """\
A vision-language model reads a picture and a question and writes an answer. It can describe the
scene, read the text on a sign, copy the numbers from a table, explain what a chart shows, and point
at things by drawing boxes around them. The picture is cut into square tiles; every tile becomes a
grid of small patches, and every patch becomes a vector. A small network merges four neighbouring
patches into one token, so a tile of three hundred and eighty-four pixels turns into one hundred and
ninety-six tokens. The language model then reads the image tokens and the words of the question
together, one layer after another. In each layer a router picks a few experts for every token; only
those experts run, which is why a large mixture of experts can answer quickly. The answer comes out
one token at a time: the model looks at everything written so far and guesses the next piece of a
word. Documents, receipts, invoices, forms, street signs, menus, slides, diagrams, maps, charts and
handwritten notes are all pictures with text in them. Where is the red circle? What is the total on
this receipt? Which bar is the tallest? Read the title of the page. Locate the person on the left.
"""

CHUNK_ELEMENTS = 1 << 24  # 16M values per generated chunk: 64 MB of float32 at most in flight
# A generated checkpoint: this file instead of safetensors; Checkpoint.open reads it through GeneratedFile
GENERATED_NAME = "generated-weights.json"
GENERATOR = "vl2edge.synthetic"


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE (no prefix space, like DeepSeek's) with the official special tokens at ids 0..10."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TEXT] * 4, trainer)
    return tok


def write_tokenizer(out: Path, vocab_size: int = 512) -> None:
    build_tokenizer(vocab_size).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizer", "unk_token": None, "use_default_system_prompt": False}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": CHAT, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2))


def _scale(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the random init for one tensor: keeps activations O(1) through random layers."""
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight")):
        return 1.0, 0.1
    if name.endswith(("norm.bias", "norm1.bias", "norm2.bias")):
        return 0.0, 0.02
    if name.endswith("e_score_correction_bias"):
        return 0.0, 0.1
    if name.endswith(".bias"):
        return 0.0, 0.02
    if name.endswith(("embed_tokens.weight", "latent")) or name in ("image_newline", "view_seperator"):
        return 0.0, 1.0
    if name.endswith("pos_embed"):
        return 0.0, 0.5
    if name.endswith(("mlp.gate.weight", "lm_head.weight")):
        return 0.0, 2.0 / math.sqrt(fan_in)  # peaked routing and logits, like a trained model
    return 0.0, 1.0 / math.sqrt(fan_in)


def tensor_chunks(name: str, shape: tuple[int, ...], dtype: str, seed: int) -> Iterator[np.ndarray]:
    """One tensor's values in row chunks (C order), seeded from (seed, name): any tensor is reproducible
    on its own, whether written to a file or generated when read (GeneratedFile)."""
    mean, std = _scale(name, shape)
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())]))
    rows = shape[0] if shape else 1
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, CHUNK_ELEMENTS // per_row)
    for r in range(0, rows, step):
        n = min(step, rows - r) * per_row
        x = rng.standard_normal(n, dtype=np.float32)
        x *= np.float32(std)
        x += np.float32(mean)
        yield f32_to_bf16(x) if dtype == "BF16" else x.astype(STORAGE[dtype], copy=False)


def random_chunks(config: VL2Config, dtype: str, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """(name, chunk) for every tensor of the model, in order."""
    for name, shape in config.tensor_shapes().items():
        for chunk in tensor_chunks(name, shape, dtype, seed):
            yield name, chunk


class GeneratedFile:
    """The tensors of a generated checkpoint, made from (seed, name) when read: what `write_model` would
    have written, byte for byte, for models too big for the disk (full-size Base). Same interface as
    weights.SafetensorsFile (`entries`, `metadata`, `raw`, `release`), so everything that reads a
    checkpoint reads this one the same way. The last tensor made is kept until `release` or the next one
    (row-chunked readers slice the same tensor several times)."""

    def __init__(self, root: Path):
        from . import schema
        from .errors import CheckpointError

        self.path = root / GENERATED_NAME
        where = str(self.path)
        spec = schema.Fields(schema.load_file(self.path), where, CheckpointError)
        if spec.text("generator", max_len=64) != GENERATOR:
            raise CheckpointError(f"{where}: generator {spec.obj.get('generator')!r} is not {GENERATOR!r}")
        self.seed = schema.as_int(spec.obj.get("seed"), f"{where}: seed", 0, 2**63 - 1, CheckpointError)
        self.dtype = spec.text("dtype", max_len=8)
        if self.dtype not in ("F32", "BF16", "F16"):
            raise CheckpointError(f"{where}: dtype {self.dtype!r} is not one of F32, BF16, F16")
        config = VL2Config.from_pretrained(root)
        size = np.dtype(STORAGE[self.dtype]).itemsize
        self.entries = {name: (self.dtype, shape, 0, math.prod(shape) * size)
                        for name, shape in config.tensor_shapes().items()}
        self.metadata = {"format": "pt"}
        self._last: tuple[str, np.ndarray] | None = None

    def raw(self, name: str) -> np.ndarray:
        if self._last is None or self._last[0] != name:
            self._last = None  # the previous tensor goes before the next is made
            shape = self.entries[name][1]
            out: np.ndarray = np.empty(math.prod(shape), STORAGE[self.dtype])
            at = 0
            for chunk in tensor_chunks(name, shape, self.dtype, self.seed):
                out[at:at + chunk.size] = chunk
                at += chunk.size
            self._last = (name, out.reshape(shape))
        return self._last[1]

    def release(self, name: str) -> None:
        if self._last is not None and self._last[0] == name:
            self._last = None


def write_model(config: VL2Config | str, out, *, dtype: str = "float32", seed: int = 0,
                max_shard_bytes: int | None = None, progress: bool = False, generated: bool = False) -> Path:
    """Write a complete random-weight model directory; returns its path.

    Checkpoints over 64 MiB are sharded like the official repos (8 GiB shards + index) unless
    `max_shard_bytes` says otherwise. generated: write GENERATED_NAME instead of the tensors (a few
    hundred bytes for any size; the same values, made when read: GeneratedFile).
    """
    if isinstance(config, str):
        config = preset(config)
    st = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    cfg["torch_dtype"] = cfg["language_config"]["torch_dtype"] = dtype
    cfg["language_config"] |= {"bos_token_id": 0, "eos_token_id": 1}  # the demo tokenizer's ids
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "processor_config.json").write_text(json.dumps(
        {**PROCESSOR_CONFIG, "candidate_resolutions": config.candidate_resolutions,
         "patch_size": config.vision_config.patch_size,
         "downsample_ratio": config.projector_config.downsample_ratio}, indent=2))
    write_tokenizer(out, min(config.language_config.vocab_size, 512))
    if generated:
        (out / GENERATED_NAME).write_text(json.dumps({"generator": GENERATOR, "seed": seed, "dtype": st}, indent=2))
        return out
    specs = {k: (st, s) for k, s in config.tensor_shapes().items()}
    total = sum(math.prod(s) for s in config.tensor_shapes().values()) * np.dtype(STORAGE[st]).itemsize
    if max_shard_bytes is None and total > 64 * 2**20:
        max_shard_bytes = 8 * 2**30
    chunks = random_chunks(config, st, seed)
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", disable=None)

        def counted(it):
            for name, c in it:
                yield name, c
                bar.update(c.nbytes)
        chunks = counted(chunks)
    write_checkpoint(out, specs, chunks, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    if progress:
        bar.close()
    return out


def sample_image(width: int = 640, height: int = 480):
    """A deterministic picture with shapes and a caption, so the demo needs no downloaded image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (235, 240, 248))
    d = ImageDraw.Draw(img)
    for i in range(0, height, 24):
        d.line([(0, i), (width, i)], fill=(220, 226, 236))
    d.ellipse([width * 0.08, height * 0.2, width * 0.38, height * 0.6], fill=(220, 40, 40), outline=(90, 0, 0))
    d.rectangle([width * 0.5, height * 0.25, width * 0.9, height * 0.7], fill=(40, 110, 220), outline=(0, 30, 90))
    d.polygon([(width * 0.2, height * 0.92), (width * 0.32, height * 0.68), (width * 0.44, height * 0.92)],
              fill=(40, 170, 80))
    d.text((width * 0.5, height * 0.8), "vl2edge demo: a red circle, a blue box", fill=(20, 20, 20))
    return img


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vl2edge.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="test-mha", choices=PRESETS)
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 for the official sizes (like the released files), float32 otherwise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    ap.add_argument("--sample-image", metavar="PNG", help="also write the demo picture here")
    ap.add_argument("--generated", action="store_true",
                    help=f"write {GENERATED_NAME} instead of the weights: the same values, made when read "
                         "(full-size models on a small disk)")
    a = ap.parse_args(argv)
    dtype = a.dtype or ("float32" if a.preset.startswith("test-") else "bfloat16")
    from .errors import VL2Error
    from .outputs import OutputDir, write_file

    try:  # a folder that holds files is refused without --overwrite; written whole or not at all
        with OutputDir(a.out, a.overwrite) as tmp:
            write_model(a.preset, tmp, dtype=dtype, seed=a.seed, progress=True, generated=a.generated)
        if a.sample_image:
            picture = io.BytesIO()
            sample_image().save(picture, format="PNG")
            write_file(a.sample_image, picture.getvalue())
    except VL2Error as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = a.out
    print(f"wrote {a.preset} ({dtype}, random weights{', generated when read' if a.generated else ''}) to {out}")


if __name__ == "__main__":
    main()
