import numpy as np
import pytest
from PIL import Image

from tests import golden
from vl2edge.errors import InputError
from vl2edge.processor import Processor, select_best_resolution


@pytest.fixture(scope="module")
def proc():
    return Processor.from_pretrained(golden.model_dir("tiny"))


@pytest.mark.parametrize("variant", golden.VARIANTS)
@pytest.mark.parametrize("case", golden.CASES)
def test_matches_the_reference_exactly(variant, case):
    proc = Processor.from_pretrained(golden.model_dir(variant))
    conv, images = golden.conversation(case)
    out = proc(conv, images)
    ref = golden.processor_outputs(case)
    for k in ("input_ids", "attention_mask", "images_seq_mask", "images_spatial_crop", "images"):
        got = getattr(out, k)
        assert got.dtype == ref[k].dtype and got.shape == ref[k].shape, k
        assert np.array_equal(got, ref[k]), k  # pixels bit-exact


# Image-token counts the reference processor gives (`DeepseekVLV2Processor.tokenize_with_images` in
# deepseek_vl2/models/processing_deepseek_vl_v2.py).
TOKEN_COUNTS = [((384, 384), 421), ((100, 100), 421), ((385, 385), 1023), ((640, 480), 1023), ((800, 600), 1415),
                ((1024, 768), 1415), ((768, 1024), 1429), ((768, 2000), 1835), ((2000, 768), 1807),
                ((1920, 1080), 1807), ((1080, 1920), 1835), ((500, 2000), 1051), ((4000, 1000), 1009),
                ((1152, 1152), 2017), ((3000, 3000), 2017)]


@pytest.mark.parametrize("size,count", TOKEN_COUNTS)
def test_image_token_counts(proc, size, count):
    out = proc([{"role": "user", "content": "<image>\nWhat is this?"}], [Image.new("RGB", size, (10, 200, 30))])
    assert out.images_seq_mask.sum() == count == out.num_image_tokens[0][0]
    w, h = out.images_spatial_crop[0, 0]
    assert out.images.shape[1] == 1 + w * h


def test_best_resolution_prefers_less_waste_on_ties():
    cands = [(384, 384), (384, 768), (768, 384), (768, 768)]
    assert select_best_resolution((384, 384), cands) == (384, 384)
    assert select_best_resolution((700, 350), cands) == (768, 384)
    assert select_best_resolution((10, 10), cands) == (384, 384)


def test_three_images_turn_tiling_off(proc):
    imgs = [Image.new("RGB", (1024, 768), (200, 0, 0)), Image.new("RGB", (300, 900), (0, 0, 200)),
            Image.new("RGB", (50, 60), (0, 99, 0))]
    out = proc([{"role": "user", "content": "<image><image>\n<image> compare"}], imgs)
    assert out.images_spatial_crop[0].tolist() == [[1, 1]] * 3
    assert out.num_image_tokens[0] == [421] * 3
    for i in range(3):  # the single local tile is the global view again
        assert np.array_equal(out.images[0, 2 * i], out.images[0, 2 * i + 1])


def test_pad_colour_is_127(proc):
    out = proc([{"role": "user", "content": "<image>"}], [Image.new("RGB", (384, 100), (255, 255, 255))])
    pad = (np.float32(127) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    assert out.images[0, 0, :, 0, 0].tolist() == [pad] * 3
    assert out.images[0, 0, :, 192, 192].tolist() == [1.0] * 3


def test_multi_turn_template_quirks(proc):
    conv = [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": " yo "}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": ""}]
    out = proc(conv)
    text = proc.decode(out.input_ids[0])
    bos, eos = proc.decode([proc.bos_id]), proc.decode([proc.eos_id])
    assert text == f"{bos}Be brief.<|User|>: Hi there\n\n<|Assistant|>:yo{eos}<|User|>: q2\n\n<|Assistant|>:"
    # ending on the user turn is the same prompt as ending on an empty assistant turn
    assert np.array_equal(proc(conv[:-1]).input_ids, out.input_ids)
    # a non-empty last assistant turn is left open (no eos) so the model continues it
    opened = proc(conv[:-1] + [{"role": "<|Assistant|>", "content": "Sure"}])
    assert proc.decode(opened.input_ids[0]).endswith("<|Assistant|>:Sure")


def test_images_from_the_messages(proc):
    conv, images = golden.conversation("multi3_two_turns")
    with_keys = [dict(m) for m in conv]
    with_keys[0]["images"], with_keys[2]["images"] = images[:2], images[2:]
    assert np.array_equal(proc(with_keys).input_ids, proc(conv, images).input_ids)


def test_text_is_split_at_images_before_tokenizing(proc):
    # "a<image>b": the pieces are encoded apart, so no merge crosses the image
    out = proc([{"role": "user", "content": "the<image>the"}], [Image.new("RGB", (64, 64))])
    ids, mask = out.input_ids[0], out.images_seq_mask[0]
    first, last = np.flatnonzero(mask)[[0, -1]]
    assert proc.decode(ids[:first]).endswith("the") and proc.decode(ids[last + 1:]).startswith("the")


def test_collate_left_pads(proc):
    a = proc([{"role": "user", "content": "<image> what?"}], [Image.new("RGB", (800, 600))])
    b = proc([{"role": "user", "content": "hello"}])
    batch = proc.collate([a, b])
    T = len(a)
    assert batch.input_ids.shape == (2, T) and batch.images.shape == (2, 7, 3, 384, 384)
    assert np.array_equal(batch.input_ids[1, T - len(b):], b.input_ids[0])
    assert (batch.input_ids[1, :T - len(b)] == proc.pad_id).all() and not batch.attention_mask[1, :T - len(b)].any()
    assert batch.images_spatial_crop[1].tolist() == [[0, 0]]


@pytest.mark.parametrize("conv,images,match", [
    ([{"role": "user", "content": "<image> and <image>"}], 1, "2 <image> placeholder"),
    ([{"role": "user", "content": "no image"}], 1, "0 <image>"),
    ([{"role": "robot", "content": "hi"}], 0, "unknown role"),
    ([{"role": "user", "content": ["hi"]}], 0, "must be a string"),
    ([{"role": "user"}], 0, "'role' and 'content'"),
    ([], 0, "non-empty list"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}], 0, "first message"),
    ([{"role": "assistant", "content": "<image>"}, {"role": "user", "content": "<image>"}], 1, "assistant"),
])
def test_bad_conversations(proc, conv, images, match):
    with pytest.raises(InputError, match=match):
        proc(conv, [Image.new("RGB", (32, 32))] * images)


def test_bad_images(proc, tmp_path):
    conv = [{"role": "user", "content": "<image>"}]
    (tmp_path / "notes.png").write_text("this is not a picture")
    good = tmp_path / "ok.png"
    Image.new("RGB", (200, 100), (1, 2, 3)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    for src, match in [(tmp_path / "missing.png", "not found"), (tmp_path / "notes.png", "cannot read"),
                       (tmp_path / "cut.png", "cannot read"), (tmp_path, "directory"), (3.5, "PIL image")]:
        with pytest.raises(InputError, match=match):
            proc(conv, [src])
    rgba = Image.new("RGBA", (50, 40), (255, 0, 0, 0))
    assert proc(conv, [good.read_bytes()]).images.shape == proc(conv, [rgba]).images.shape == (1, 2, 3, 384, 384)
