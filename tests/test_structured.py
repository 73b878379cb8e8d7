"""Structured output (vl2edge/structured.py): JSON that a strict parser accepts and the schema validates, even
from a random-weight model, on both backends; schemas the library cannot compile are refused with its reason.

Every output is parsed with Python's `json.loads` (strict: raw control characters in strings are refused)
and checked with `jsonschema` against the schema it was generated for.
"""

import json

import jsonschema
import pytest

from vl2edge.errors import InputError
from vl2edge.export.build import export
from vl2edge.pipeline import load
from vl2edge.structured import JsonFormat, string_state
from vl2edge.synthetic import write_model

RECEIPT = {"type": "object", "additionalProperties": False, "required": ["merchant", "total", "items", "kind"],
           "properties": {"merchant": {"type": "string"}, "total": {"type": "number"},
                          "kind": {"enum": ["receipt", "invoice", "credit note"]},
                          "items": {"type": "array", "items": {
                              "type": "object", "required": ["sku", "qty", "price"], "additionalProperties": False,
                              "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"},
                                             "price": {"type": "number"}}}}}}
NESTED = {"type": "object", "required": ["form"], "properties": {"form": {
    "type": "object", "required": ["fields", "signed"], "properties": {
        "signed": {"type": "boolean"}, "date": {"type": ["string", "null"]},
        "fields": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "required": ["label", "value"],
            "properties": {"label": {"type": "string"}, "value": {"type": "string"}}}}}}}}
TABLE = {"type": "array", "minItems": 2, "items": {"type": "array", "items": {"type": "integer"}}}
SCHEMAS = {"receipt": RECEIPT, "nested": NESTED, "table": TABLE}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    d = tmp_path_factory.mktemp("structured")
    write_model("test-mha", d / "model")
    export(d / "model", d / "onnx", "int4-experts", vision="float", progress=False)
    return {"torch": load(d / "model", backend="torch"), "onnx": load(d / "onnx")}


def _ask(pipe, fmt, **kw):
    return pipe.chat([{"role": "user", "content": "Read the document and answer in JSON."}], response_format=fmt,
                     **kw)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_weights_answer_valid_json_for_the_schema(pipes, backend, name):
    fmt = JsonFormat.from_schema(SCHEMAS[name])
    for temperature, seed, budget in ((0.0, 0, 96), (1.0, 1, 96), (1.0, 2, 200)):
        res = _ask(pipes[backend], fmt, max_new_tokens=budget, temperature=temperature, seed=seed)
        value = json.loads(res.text)  # strict: no raw control characters, nothing after the value
        jsonschema.validate(value, SCHEMAS[name])
        assert len(res.token_ids) <= budget and res.finish_reason == "stop"


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_json_object_is_any_object(pipes, backend):
    res = _ask(pipes[backend], JsonFormat.any_object(), max_new_tokens=80, temperature=1.0, seed=3)
    assert isinstance(json.loads(res.text), dict)


def test_without_the_constraint_the_random_model_writes_no_json(pipes):
    """The mechanism is what makes the JSON: the same request unconstrained is not JSON."""
    res = _ask(pipes["torch"], None, max_new_tokens=96, temperature=1.0, seed=1)
    with pytest.raises(ValueError):
        json.loads(res.text)


@pytest.mark.parametrize("schema,reason", [
    ({"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}, "missing"),
    ({"type": "frobnicate"}, "frobnicate"),
    ({"type": "string", "pattern": "(unclosed"}, ""),
    ([1, 2], "JSON object"),
])
def test_a_schema_the_library_cannot_compile_is_refused_with_its_reason(schema, reason):
    with pytest.raises(InputError, match="schema") as e:
        JsonFormat.from_schema(schema)
    assert reason.lower() in str(e.value).lower()


def test_string_state_follows_quotes_and_escapes():
    state = (False, False)
    for piece, inside in (('{"a', True), ('b\\"', True), ('c"', False), (':"', True), ('\\\\', True), ('"}', False)):
        state = string_state(*state, piece)
        assert state[0] is inside, piece


def test_cli_run_and_batch_take_a_json_schema_file(tmp_path, capsys):
    from PIL import Image

    from vl2edge import cli

    write_model("test-mha", tmp_path / "model")
    (tmp_path / "receipt.json").write_text(json.dumps(RECEIPT))
    Image.new("RGB", (64, 48), "white").save(tmp_path / "a.png")
    Image.new("RGB", (48, 64), "black").save(tmp_path / "b.png")
    common = ["--model", str(tmp_path / "model"), "--backend", "torch", "--json-schema", str(tmp_path / "receipt.json"),
              "--max-new-tokens", "120", "--temperature", "1", "--seed", "4"]
    cli.main(["run", *common, "--image", str(tmp_path / "a.png"), "--prompt", "Read the receipt.", "--json"])
    jsonschema.validate(json.loads(json.loads(capsys.readouterr().out)["text"]), RECEIPT)
    cli.main(["batch", *common, str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--prompt", "Read the receipt.",
              "--out", str(tmp_path / "out.jsonl")])
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        jsonschema.validate(r["json"], RECEIPT)
        assert json.loads(r["answer"]) == r["json"]


@pytest.mark.parametrize("content,fragment", [(None, "cannot read"), ("{not json", "not valid JSON"),
                                              ('{"type": "frobnicate"}', "frobnicate")])
def test_cli_bad_schema_files_exit_2_with_one_line(tmp_path, content, fragment):
    import subprocess
    import sys

    write_model("test-mha", tmp_path / "model")
    schema = tmp_path / "s.json"
    if content is not None:
        schema.write_text(content)
    r = subprocess.run([sys.executable, "-m", "vl2edge", "run", "--model", str(tmp_path / "model"), "--backend",
                        "torch", "--prompt", "hi", "--json-schema", str(schema)], capture_output=True, text=True)
    assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


UNSATISFIABLE = [
    {"type": "integer", "minimum": 5, "maximum": 3},
    {"type": "string", "minLength": 20000},
    {"type": "array", "minItems": 3, "maxItems": 1},
    {"enum": []},
    {"not": {}},
    {"allOf": [{"type": "string"}, {"type": "integer"}]},
    {"type": "object", "required": ["a"], "properties": {"a": {"$ref": "#"}}},  # every value holds itself
    {"type": "object", "required": ["a"], "properties": {"a": False}},
]


@pytest.mark.parametrize("schema", UNSATISFIABLE, ids=range(len(UNSATISFIABLE)))
def test_a_schema_no_value_satisfies_is_refused_before_the_answer(pipes, schema):
    """No first token, or no end within the plan: one line, an InputError (HTTP 400, exit 2) before any token."""
    try:
        fmt = JsonFormat.from_schema(schema)
    except InputError:
        return  # the library refuses it at compile time: refused up front too
    with pytest.raises(InputError, match="response format") as err:
        _ask(pipes["onnx"], fmt, max_new_tokens=60)
    assert "\n" not in str(err.value)


def test_an_answer_longer_than_the_budget_is_refused_and_one_that_fits_closes(pipes):
    fmt = JsonFormat.from_schema({"type": "array", "minItems": 12, "items": {"type": "integer"}})
    with pytest.raises(InputError, match="more than the 8 allowed"):
        _ask(pipes["torch"], fmt, max_new_tokens=8)
    res = _ask(pipes["torch"], fmt, max_new_tokens=80, temperature=1.0, seed=0)
    assert len(json.loads(res.text)) >= 12 and res.finish_reason == "stop"


STRING_FORMATS = [{"type": "string", "format": "email"}, {"type": "string", "format": "date-time"},
                  {"type": "string", "format": "uuid"}, {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.(com|org)$"},
                  {"type": "object", "required": ["mail"], "properties": {"mail": {"type": "string",
                                                                                   "format": "email"}}}]


@pytest.mark.parametrize("schema", STRING_FORMATS, ids=range(len(STRING_FORMATS)))
def test_string_formats_and_patterns_close_inside_the_budget(pipes, schema):
    """A pattern or format that does not allow the closing quote yet (an e-mail needs its @ and a domain): the
    closing plan walks through the characters the pattern allows, so the answer still ends valid in budget."""
    fmt = JsonFormat.from_schema(schema)
    for seed in range(3):
        res = _ask(pipes["torch"], fmt, max_new_tokens=160, temperature=1.0, seed=seed)
        jsonschema.validate(json.loads(res.text), schema, format_checker=jsonschema.FormatChecker())
        assert len(res.token_ids) <= 160 and res.finish_reason == "stop"
