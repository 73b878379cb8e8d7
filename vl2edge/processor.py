"""The DeepSeek-VL2 processor, exactly: chat template, tokenization, image tiling, image-token layout.

Reproduces `DeepseekVLV2Processor` (`deepseek_vl2/models/processing_deepseek_vl_v2.py`) without
transformers or torch:
the tokenizer is `tokenizer.json` through the `tokenizers` library, images go through PIL
(`ImageOps.pad`, bicubic, pad colour 127) and numpy. Outputs are numpy arrays shaped like the
official tensors: input_ids int64 [1,T], attention_mask bool [1,T], images float32 [1,n,3,S,S],
images_seq_mask bool [1,T], images_spatial_crop int64 [1,N,2] ([w_tiles, h_tiles]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from . import schema
from .config import MAX_IMAGE, VL2Config
from .errors import ConfigError, InputError
from .images import load_image

USER, ASSISTANT, SYSTEM = "<|User|>", "<|Assistant|>", "system"
ROLES = {"<|User|>": USER, "user": USER, "<|Assistant|>": ASSISTANT, "assistant": ASSISTANT,
         "system": SYSTEM, "deepseekapi-sys": SYSTEM}
GROUNDING_TOKENS = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"]


@dataclass(frozen=True)
class ProcessorConfig:
    """`processor_config.json`; defaults are the reference constructor's."""

    candidate_resolutions: tuple = ((384, 384),)
    patch_size: int = 14
    downsample_ratio: int = 2
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    normalize: bool = True
    image_token: str = "<image>"
    pad_token: str = "<｜▁pad▁｜>"

    @classmethod
    def from_dict(cls, d, where: str = "processor_config.json") -> ProcessorConfig:
        f = schema.Fields(d, where)
        res = f.array("candidate_resolutions", max_len=256)
        pairs = tuple(tuple(schema.as_int(v, f"{where}: candidate_resolutions[{i}]", 1, MAX_IMAGE)
                            for v in (r if isinstance(r, list) and len(r) == 2 else [None, None]))
                      for i, r in enumerate(res))
        if not pairs:
            raise ConfigError(f"{where}: candidate_resolutions must be a non-empty list of [width, height]")
        S = pairs[0][0]
        if any(w % S or h % S for w, h in pairs):
            raise ConfigError(f"{where}: every candidate resolution must be a multiple of the tile size {S} "
                              f"(the first entry's width), got {[list(p) for p in pairs]}")

        def triple(key: str, positive: bool) -> tuple[float, float, float]:
            vals = f.array(key, (0.5, 0.5, 0.5), max_len=3)
            if len(vals) != 3:
                raise f.fail(key, "3 numbers (R, G, B)", vals)
            t = schema.Fields(dict(zip("rgb", vals)), f"{where}: {key}")
            return (t.number("r", lo=-10.0, hi=10.0, positive=positive), t.number("g", lo=-10.0, hi=10.0,
                    positive=positive), t.number("b", lo=-10.0, hi=10.0, positive=positive))

        return cls(candidate_resolutions=pairs, patch_size=f.integer("patch_size", 14, 1, S),
                   downsample_ratio=f.integer("downsample_ratio", 2, 1, 16), image_mean=triple("image_mean", False),
                   image_std=triple("image_std", True), normalize=f.boolean("normalize", True),
                   image_token=_token_text(f, "image_token", "<image>"),
                   pad_token=_token_text(f, "pad_token", cls.pad_token))

    @property
    def image_size(self) -> int:
        return self.candidate_resolutions[0][0]

    @property
    def tokens_per_side(self) -> int:
        """14 for 384/14 patches merged 2x2: ceil(27 / 2)."""
        return math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)


@dataclass
class ProcessorOutput:
    input_ids: np.ndarray            # int64 [B,T]
    attention_mask: np.ndarray       # bool  [B,T]
    images: np.ndarray               # float32 [B,n,3,S,S]
    images_seq_mask: np.ndarray      # bool  [B,T]
    images_spatial_crop: np.ndarray  # int64 [B,N,2], [w_tiles, h_tiles]
    image_sizes: list = field(default_factory=list)        # per sample: original (w, h) of each image
    num_image_tokens: list = field(default_factory=list)   # per sample: tokens of each image

    def __len__(self) -> int:
        return self.input_ids.shape[1]


def select_best_resolution(size: tuple[int, int], candidates) -> tuple[int, int]:
    """The candidate (w, h) that keeps the most pixels after an aspect-preserving fit; ties: least waste."""
    w, h = size
    best, best_eff, best_waste = None, 0, float("inf")
    for cw, ch in candidates:
        s = min(cw / w, ch / h)
        eff = min(int(w * s) * int(h * s), w * h)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cw, ch), eff, waste
    assert best is not None  # candidates is non-empty (ProcessorConfig.from_dict checks it)
    return best


def _token_text(f: schema.Fields, key: str, default: str) -> str:
    t = f.text(key, default, max_len=64)
    if not t.strip():
        raise f.fail(key, "a non-empty token string", t)
    return t


def check_compatible(processor: Processor, model: VL2Config, where: str) -> None:
    """processor_config.json must tile images the way the model's vision tower and projector expect, and
    every token id the tokenizer can produce (added tokens included) must have a row in the embeddings."""
    config, v, p = processor.config, model.vision_config, model.projector_config
    n = processor.tokenizer.get_vocab_size(with_added_tokens=True)
    if n > model.language_config.vocab_size:
        raise ConfigError(f"{where}/tokenizer.json: the tokenizer has {n} tokens (the image, grounding and role "
                          f"tokens included) but config.json's vocab_size is {model.language_config.vocab_size}")
    ids = processor.tokenizer.get_vocab(with_added_tokens=True)  # ids need not be dense: the largest must fit
    name, top = max(ids.items(), key=lambda kv: kv[1], default=("", -1))
    if top >= model.language_config.vocab_size:
        raise ConfigError(f"{where}/tokenizer.json: the token {name[:40]!r} has id {top}, past config.json's "
                          f"vocab_size {model.language_config.vocab_size} (no embedding row holds it)")
    for name, got, want in (("the tile size (first candidate resolution's width)", config.image_size, v.image_size),
                            ("patch_size", config.patch_size, v.patch_size),
                            ("downsample_ratio", config.downsample_ratio, p.downsample_ratio)):
        if got != want:
            raise ConfigError(f"{where}/processor_config.json: {name} is {got} but config.json's model expects "
                              f"{want}")


def _token_id(tok, d: dict, key: str):
    v = d.get(key)
    if isinstance(v, dict):
        v = v.get("content")
    return tok.token_to_id(v) if isinstance(v, str) else None


class Processor:
    """Conversation + images -> model inputs. `Processor.from_pretrained(model_dir)`."""

    def __init__(self, tokenizer, config: ProcessorConfig, bos_id: int, eos_id: int, pad_id: int):
        self.tokenizer, self.config = tokenizer, config
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.image_token_id = tokenizer.token_to_id(config.image_token)

    @classmethod
    def from_pretrained(cls, path) -> Processor:
        from tokenizers import AddedToken, Tokenizer

        root = Path(path)
        try:
            found = root.is_dir() and all((root / f).is_file() for f in ("tokenizer.json", "processor_config.json"))
        except OSError as e:  # a name too long, a path through a file
            raise ConfigError(f"cannot read {root}: {e.strerror or e}") from None
        if not root.is_dir():
            raise ConfigError(f"no such model directory: {root}")
        if not found:
            raise ConfigError(f"{root} lacks tokenizer.json or processor_config.json: a DeepSeek-VL2 model "
                              "directory holds tokenizer.json, tokenizer_config.json and processor_config.json")
        config = ProcessorConfig.from_dict(schema.load_file(root / "processor_config.json"),
                                           str(root / "processor_config.json"))
        raw = schema.read_bounded(root / "tokenizer.json", str(root / "tokenizer.json"), schema.MAX_FILE_BYTES)
        try:
            tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:
            raise ConfigError(f"{root / 'tokenizer.json'} cannot be loaded: {e}") from None
        names: dict[str, object] = {}
        for f in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            if (root / f).is_file():
                names |= schema.Fields(schema.load_file(root / f), str(root / f)).obj
        # The reference registers these (they already exist in the released vocabularies, so ids stay put).
        pad_id = _token_id(tok, names, "pad_token")
        extra = ([] if pad_id is not None else [config.pad_token]) + [config.image_token, *GROUNDING_TOKENS,
                                                                         "<|User|>", "<|Assistant|>"]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
        pad_id = pad_id if pad_id is not None else tok.token_to_id(config.pad_token)
        assert pad_id is not None  # pad_token was just registered above
        bos_id, eos_id = _token_id(tok, names, "bos_token"), _token_id(tok, names, "eos_token")
        if bos_id is None or eos_id is None:
            raise ConfigError(f"{root}: tokenizer_config.json must name bos_token and eos_token found in "
                              "tokenizer.json")
        if tok.token_to_id(config.image_token) is None or len(tok.encode(config.image_token,
                                                                         add_special_tokens=False).ids) != 1:
            raise ConfigError(f"{root}: the image token {config.image_token!r} does not encode as one token")
        return cls(tok, config, bos_id, eos_id, pad_id)

    # -- text -----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- images ---------------------------------------------------------------------------------------

    def _to_array(self, tile: Image.Image) -> np.ndarray:
        """ToTensor + Normalize in float32, in the reference's order of operations."""
        x = np.asarray(tile, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        if self.config.normalize:
            mean = np.asarray(self.config.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.config.image_std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return x

    def tile_image(self, img: Image.Image, cropping: bool) -> tuple[list[np.ndarray], tuple[int, int]]:
        """Global view + local tiles (row-major) for one image, and [w_tiles, h_tiles]."""
        c, S = self.config, self.config.image_size
        bw, bh = select_best_resolution(img.size, c.candidate_resolutions) if cropping else (S, S)
        fill = tuple(int(m * 255) for m in c.image_mean)
        tiles = [self._to_array(ImageOps.pad(img, (S, S), color=fill))]
        local = ImageOps.pad(img, (bw, bh), color=fill)
        for y in range(0, bh, S):
            for x in range(0, bw, S):
                tiles.append(self._to_array(local.crop((x, y, x + S, y + S))))
        return tiles, (bw // S, bh // S)

    def image_token_count(self, w_tiles: int, h_tiles: int) -> int:
        """Global rows with a newline each, one view separator, local rows with a newline each."""
        n = self.config.tokens_per_side
        return n * (n + 1) + 1 + (h_tiles * n) * (w_tiles * n + 1)

    # -- the conversation ------------------------------------------------------------------------------

    def __call__(self, conversation, images=None) -> ProcessorOutput:
        """conversation: [{"role": "<|User|>"|"user"|"<|Assistant|>"|"assistant"|"system", "content": str,
        optional "images": [...]}, ...]; images: PIL images / paths / bytes in placeholder order (default:
        the messages' own "images" lists)."""
        messages = _check_messages(conversation)
        if images is None:
            images = [im for m in messages for im in (m.get("images") or [])]
        images = list(images)
        token = self.config.image_token
        wanted = sum(m["content"].count(token) for m in messages if ROLES[m["role"]] == USER)
        if wanted != len(images):
            raise InputError(f"the conversation has {wanted} {token} placeholder(s) but {len(images)} image(s) "
                             "were given")
        pil = [load_image(im) for im in images]
        cropping = len(pil) <= 2  # with 3+ images every image is a single 384x384 view (plus its global view)

        ids, mask = [self.bos_id], [False]
        tiles, crops, counts = [], [], []
        next_image = iter(pil)
        for i, m in enumerate(messages):
            role, content = ROLES[m["role"]], m["content"].strip()
            if role == SYSTEM:
                if i != 0:
                    raise InputError("a system message may only be the first message")
                piece = self.encode(content)
                ids += piece
                mask += [False] * len(piece)
            elif role == USER:
                prompt = f"{USER}: {content}\n\n{ASSISTANT}:" if content else f"{USER}:{ASSISTANT}:"
                parts = prompt.split(token)
                for j, text in enumerate(parts):
                    piece = self.encode(text)  # pieces are tokenized apart: no BPE merge across an image
                    ids += piece
                    mask += [False] * len(piece)
                    if j < len(parts) - 1:
                        img_tiles, crop = self.tile_image(next(next_image), cropping)
                        n = self.image_token_count(*crop)
                        tiles += img_tiles
                        crops.append(crop)
                        counts.append(n)
                        ids += [self.image_token_id] * n
                        mask += [True] * n
            else:
                if token in content:
                    raise InputError(f"an assistant message cannot hold {token} placeholders")
                # a past answer is followed by eos; the last one is left open so the model continues it
                piece = self.encode(content) + ([self.eos_id] if i < len(messages) - 1 else [])
                ids += piece
                mask += [False] * len(piece)

        S = self.config.image_size
        if tiles:
            pixels, crop_arr = np.stack(tiles)[None], np.asarray(crops, dtype=np.int64)[None]
        else:
            pixels, crop_arr = np.zeros((1, 1, 3, S, S), np.float32), np.zeros((1, 1, 2), np.int64)
        return ProcessorOutput(
            input_ids=np.asarray([ids], dtype=np.int64), attention_mask=np.ones((1, len(ids)), dtype=bool),
            images=pixels, images_seq_mask=np.asarray([mask], dtype=bool), images_spatial_crop=crop_arr,
            image_sizes=[[im.size for im in pil]], num_image_tokens=[counts])

    def collate(self, outputs: list[ProcessorOutput]) -> ProcessorOutput:
        """Left-pad single-sample outputs into one batch (pad id, mask false, zero tiles, [0,0] crops)."""
        T = max(len(o) for o in outputs)
        n = max(o.images.shape[1] for o in outputs)
        N = max(o.images_spatial_crop.shape[1] for o in outputs)
        B, S = len(outputs), self.config.image_size
        ids = np.full((B, T), self.pad_id, np.int64)
        att, seq = np.zeros((B, T), bool), np.zeros((B, T), bool)
        pix, crop = np.zeros((B, n, 3, S, S), np.float32), np.zeros((B, N, 2), np.int64)
        for b, o in enumerate(outputs):
            t = len(o)
            ids[b, T - t:], att[b, T - t:], seq[b, T - t:] = o.input_ids[0], o.attention_mask[0], o.images_seq_mask[0]
            pix[b, :o.images.shape[1]] = o.images[0]
            crop[b, :o.images_spatial_crop.shape[1]] = o.images_spatial_crop[0]
        return ProcessorOutput(ids, att, pix, seq, crop, [s for o in outputs for s in o.image_sizes],
                               [c for o in outputs for c in o.num_image_tokens])


def _check_messages(conversation) -> list[dict]:
    if isinstance(conversation, dict) or not isinstance(conversation, (list, tuple)) or not conversation:
        raise InputError("a conversation is a non-empty list of {'role': ..., 'content': ...} messages")
    for m in conversation:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"each message needs 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise InputError(f"unknown role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise InputError(f"message content must be a string, got {type(m['content']).__name__}")
        schema.check_text(m["content"], "a message", InputError)
    return list(conversation)
