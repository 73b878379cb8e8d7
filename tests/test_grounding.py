from PIL import Image

from vl2edge.grounding import draw, parse


def test_boxes_in_pixels_of_the_last_image():
    text = "<|ref|>the red circle<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|> and " \
           "<|ref|>cats<|/ref|><|det|>[[0, 0, 499, 499], [500,500,999,999]]<|/det|>"
    g = parse(text, [(100, 100), (1000, 500)])
    assert g.problems == []
    assert [b.label for b in g.boxes] == ["the red circle", "cats", "cats"]
    assert g.boxes[0].norm == (580, 270, 999, 900)
    assert g.boxes[0].pixels == (int(580 / 999 * 1000), int(270 / 999 * 500), 1000, int(900 / 999 * 500))
    assert g.boxes[2].pixels == (500, 250, 1000, 500) and g.boxes[2].image == 1
    assert parse(text).boxes[0].pixels is None  # no image: normalised only


def test_malformed_spans_are_reported_not_fatal():
    text = ("<|ref|>a<|/ref|><|det|>[[1, 2, 3]]<|/det|>"             # three numbers
            "<|ref|>b<|/ref|><|det|>[[10, 20, 30, 40]] junk<|/det|>"  # stray text
            "<|det|>[[900, 900, 100, 100]]<|/det|>"                   # no label, swapped corners
            "<|ref|>c<|/ref|><|det|>[[-5, 0, 1200, 10]]<|/det|>"      # out of range
            "<|ref|>d<|/ref|><|det|>[[1, 1, 2, 2]]")                  # unterminated (cut off by max tokens)
    g = parse(text, [(999, 999)])
    assert [(b.label, b.norm) for b in g.boxes] == [("b", (10, 20, 30, 40)), ("", (100, 100, 900, 900)),
                                                    ("c", (0, 0, 999, 10)), ("d", (1, 1, 2, 2))]
    assert len(g.problems) == 6  # the first span: unreadable numbers and no box
    assert any("unterminated" in p for p in g.problems) and any("swapped" in p for p in g.problems)
    assert parse("__import__('os').system('echo pwned')<|det|>[[__import__]]<|/det|>").boxes == []


def test_draw_marks_the_box():
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    g = parse("<|ref|>x<|/ref|><|det|>[[100, 200, 600, 800]]<|/det|>", [img.size])
    out = draw(img, g.boxes)
    x1, y1, x2, y2 = g.boxes[0].pixels
    assert out.getpixel((x1, (y1 + y2) // 2)) != (255, 255, 255)   # left edge drawn
    assert out.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == (255, 255, 255)  # inside untouched
    assert img.getpixel((x1, (y1 + y2) // 2)) == (255, 255, 255)   # the input image is not modified
