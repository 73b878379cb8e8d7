"""Property tests for every parser of untrusted text (hypothesis): whatever the bytes, each parser either
returns a value or raises a VL2Error — never another exception. The default run takes a fast sample;
`make test-all` runs the `slow` variants with many more examples. The seed is printed (and can be set
with VL2EDGE_FUZZ_SEED) so a failure can be replayed."""

import contextlib
import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests import golden
from vl2edge import schema
from vl2edge.config import VL2Config
from vl2edge.errors import VL2Error
from vl2edge.grounding import parse as parse_grounding
from vl2edge.processor import ProcessorConfig
from vl2edge.weights import SafetensorsFile

SEED = int(os.environ.get("VL2EDGE_FUZZ_SEED", "20261201"))
print(f"fuzz seed {SEED} (set VL2EDGE_FUZZ_SEED to replay)")
FAST = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=20)
CONFIG = json.loads((golden.model_dir("tiny") / "config.json").read_text())
PROCESSOR = json.loads((golden.model_dir("tiny") / "processor_config.json").read_text())


def _mutate(doc: dict, paths_and_values) -> dict:
    """Replace values at random paths of a valid document (nested dicts) with arbitrary JSON values."""
    out = json.loads(json.dumps(doc))
    for path, value in paths_and_values:
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = value
    return out


def _paths(doc: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in doc.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += _paths(v, (*prefix, k))
    return out


def _mutations(doc: dict):
    return st.lists(st.tuples(st.sampled_from(_paths(doc)), json_values), min_size=1, max_size=4)


def _only_vl2errors(fn, *args):
    with contextlib.suppress(VL2Error):
        fn(*args)


def _check_config(edits):
    _only_vl2errors(lambda: VL2Config.from_dict(_mutate(CONFIG, edits)).tensor_shapes())


def _check_processor(edits):
    _only_vl2errors(ProcessorConfig.from_dict, _mutate(PROCESSOR, edits))


def _check_header(tmp_path_factory, header):
    f = tmp_path_factory.mktemp("h") / "x.safetensors"
    h = json.dumps(header).encode("utf-8", "surrogatepass")
    f.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 256)
    _only_vl2errors(SafetensorsFile, f)


def _check_text(text):
    _only_vl2errors(schema.loads, text, "fuzz")


def _check_grounding(text):
    """Never raises; every box it returns is ordered, inside 0..999 and inside the 640x480 image."""
    for b in parse_grounding(text, [(640, 480)]).boxes:
        x1, y1, x2, y2 = b.norm
        assert 0 <= x1 <= x2 <= 999 and 0 <= y1 <= y2 <= 999, b
        assert b.pixels is not None and 0 <= b.pixels[0] <= b.pixels[2] <= 640 and \
            0 <= b.pixels[1] <= b.pixels[3] <= 480, b


headers = st.dictionaries(st.text(max_size=10), st.one_of(
    json_values, st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "U8", "I32", "x"]),
                                        "shape": st.lists(st.integers(-3, 2**40), max_size=4),
                                        "data_offsets": st.lists(st.integers(-3, 2**40), max_size=3)})), max_size=4)
grounding_text = st.lists(st.sampled_from(["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "[", "]", "[[", "]]",
                                           ",", " ", "12", "999", "-4", "1e9", "a car", "\n"]), max_size=30) \
    .map("".join)
json_text = st.one_of(st.text(max_size=200), json_values.map(json.dumps),
                      st.integers(1, 3000).map(lambda n: "[" * n + "]" * n))


@FAST
@seed(SEED)
@given(_mutations(CONFIG))
def test_config_parser(edits):
    _check_config(edits)


@FAST
@seed(SEED)
@given(_mutations(PROCESSOR))
def test_processor_config_parser(edits):
    _check_processor(edits)


@FAST
@seed(SEED)
@given(headers)
def test_safetensors_header_parser(tmp_path_factory, header):
    _check_header(tmp_path_factory, header)


@FAST
@seed(SEED)
@given(json_text)
def test_json_loader(text):
    _check_text(text)


@FAST
@seed(SEED)
@given(grounding_text)
def test_grounding_parser(text):
    _check_grounding(text)


@pytest.mark.slow
@SLOW
@seed(SEED)
@given(_mutations(CONFIG), _mutations(PROCESSOR), headers, json_text, grounding_text)
def test_every_parser_long_run(tmp_path_factory, config_edits, processor_edits, header, text, spans):
    _check_config(config_edits)
    _check_processor(processor_edits)
    _check_header(tmp_path_factory, header)
    _check_text(text)
    _check_grounding(spans)
