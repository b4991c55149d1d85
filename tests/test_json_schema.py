"""JSON schemas compiled into canvas templates: the subset's refusals (one line naming the keyword), and
the property that every answer parses and validates, over random schemas of the subset and seeds, on a
byte-level fixture (random weights: whatever they write, the masks and finishes keep it valid)."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest

import dgport
from dgport import Hole
from dgport.errors import DgportError
from dgport.json_schema import (DEFAULT_ITEMS, DEFAULT_STRING_TOKENS, MAX_DEPTH, SchemaError,
                                compile_schema)
from dgport.vocab_constraints import Choice, FractionDigits, IntegerDigits, StringChars


@pytest.fixture(scope="module")
def gen(checkpoints):
    return dgport.load(checkpoints["tiny"], backend="cpu", threads=2)


# ------------------------------------------------------------------------------------------ the compiler

def test_an_object_compiles_to_fixed_keys_and_constrained_holes():
    t = compile_schema({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 5}, "age": {"type": "integer"}, "x": {"type": "number"},
        "ok": {"type": "boolean"}, "c": {"const": {"k": [1, "a"]}}, "e": {"enum": ["r", 2]},
        "s": {"type": "string"}, "z": {"type": "null"}}, "required": ["name"], "additionalProperties": False})
    p = t.parts
    assert p[0] == '{"name": "' and p[1] == Hole(5, StringChars(True)) and p[2] == '", "age": '
    assert isinstance(p[3].kind, IntegerDigits) and p[4] == ', "x": '
    assert isinstance(p[5].kind, IntegerDigits) and p[6] == "." and isinstance(p[7].kind, FractionDigits)
    assert p[9] == Hole(1, Choice(("true", "false")))
    assert p[10] == ', "c": {"k": [1, "a"]}, "e": ' and p[11] == Hole(1, Choice(('"r"', "2")))
    assert p[13] == Hole(DEFAULT_STRING_TOKENS, StringChars(False)) and p[-1] == '", "z": null}'


def test_arrays_have_a_fixed_count_within_min_and_max_items():
    item = {"type": "integer"}
    for schema, n in (({"items": item}, DEFAULT_ITEMS), ({"items": item, "maxItems": 1}, 1),
                      ({"items": item, "minItems": 5}, 5), ({"items": item, "maxItems": 0}, 0)):
        t = compile_schema({"type": "array", **schema})
        assert sum(isinstance(p, Hole) for p in t.parts) == n


def test_refs_to_defs_are_followed_and_nullable_types_written():
    t = compile_schema({"$defs": {"p": {"type": "boolean"}}, "type": "object",
                        "properties": {"a": {"$ref": "#/$defs/p"}, "b": {"type": ["boolean", "null"]},
                                       "c": {"type": ["string", "null"], "maxLength": 2}}})
    assert t.parts[1] == Hole(1, Choice(("true", "false")))
    assert t.parts[3] == Hole(1, Choice(("true", "false", "null")))
    assert t.parts[5] == Hole(2, StringChars(True))


@pytest.mark.parametrize("schema, says", [
    ({"type": "string", "pattern": "a+"}, "'pattern'"),
    ({"type": "string", "format": "date"}, "'format'"),
    ({"type": "integer", "minimum": 0}, "'minimum'"),
    ({"type": "string", "minLength": 1}, "'minLength'"),
    ({"anyOf": [{"type": "string"}]}, "'anyOf'"),
    ({"type": "object", "properties": {"a": {"type": "string", "maxItems": 2}}}, "'maxItems' does not apply"),
    ({"type": "object", "properties": {"a": {"$ref": "#"}}}, "only '#/$defs/NAME'"),
    ({"$defs": {"n": {"type": "object", "properties": {"x": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
     "recursive"),
    ({"$ref": "#/$defs/missing"}, "names no definition"),
    ({"type": "object", "properties": {}, "required": ["a"]}, "'a' has no schema"),
    ({"type": "object", "additionalProperties": {"type": "string"}}, "additionalProperties"),
    ({"type": "array"}, "needs 'items'"),
    ({"type": "array", "items": {"type": "null"}, "minItems": 3, "maxItems": 2}, "minItems 3 is more"),
    ({"type": "string", "maxLength": -1}, "maxLength"),
    ({"type": ["string", "integer"]}, "union of several"),
    ({"type": "strin"}, "not a type"),
    ({"description": "no type"}, "no 'type'"),
    ({"type": "integer", "enum": [1, "a"]}, "is not of type integer"),
    ({"enum": []}, "enum"),
    ("{not json", "not valid JSON"),
    ([1], "must be a JSON object"),
])
def test_outside_the_subset_is_refused_in_one_line_naming_it(schema, says):
    with pytest.raises(SchemaError) as e:
        compile_schema(schema)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_deep_and_huge_schemas_are_refused():
    deep = {"type": "null"}
    for _ in range(MAX_DEPTH + 2):
        deep = {"type": "array", "items": deep, "maxItems": 1}
    with pytest.raises(SchemaError, match="nested more than"):
        compile_schema(deep)
    wide = {"type": "boolean"}
    for _ in range(6):  # 64**6 booleans: refused as soon as the budget is passed, not after building them
        wide = {"type": "array", "minItems": 64, "maxItems": 64, "items": wide}
    with pytest.raises(SchemaError, match="more than 20000 parts"):
        compile_schema(wide)
    very_deep = "[" * 100_000  # the JSON text form: Python's own recursion limit
    with pytest.raises(SchemaError):
        compile_schema(very_deep)


# ------------------------------------------------------------------------------------------ validity

def random_value(r: random.Random, depth: int = 0):
    kind = r.choice(["str", "int", "float", "bool", "null"] + (["list", "obj"] if depth < 2 else []))
    if kind == "str":
        return r.choice(["", "a", 'quo"te', "back\\slash", "new\nline", "ünï", "x" * 5])
    if kind == "int":
        return r.randint(-1000, 1000)
    if kind == "float":
        return round(r.uniform(-100, 100), 2)
    if kind == "bool":
        return r.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(r, depth + 1) for _ in range(r.randint(0, 2))]
    return {f"k{i}": random_value(r, depth + 1) for i in range(r.randint(0, 2))}


def random_schema(r: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "nullable"]
    if depth < 3:
        kinds += ["object", "array"] * 2
    kind = r.choice(kinds)
    if kind == "string":
        s = {"type": "string"}
        if r.random() < 0.6:
            s["maxLength"] = r.randint(0, 12)
        return s
    if kind in ("integer", "number", "boolean", "null"):
        return {"type": kind, **({"description": "a value"} if r.random() < 0.2 else {})}
    if kind == "enum":
        members = [random_value(r) for _ in range(r.randint(1, 5))]
        return {"enum": [m for i, m in enumerate(members) if m not in members[:i]]}
    if kind == "const":
        return {"const": random_value(r)}
    if kind == "nullable":
        return {"type": [r.choice(["string", "integer", "boolean", "number"]), "null"]}
    if kind == "array":
        s = {"type": "array", "items": random_schema(r, depth + 1)}
        if r.random() < 0.5:
            s["minItems"] = r.randint(0, 2)
        if r.random() < 0.5:
            s["maxItems"] = r.randint(s.get("minItems", 0), 4)
        return s
    props = {f"p{i}": random_schema(r, depth + 1) for i in range(r.randint(0, 4))}
    s = {"type": "object", "properties": props, "required": [k for k in props if r.random() < 0.5]}
    if r.random() < 0.5:
        s["additionalProperties"] = False
    return s


def test_every_answer_parses_and_validates_over_random_schemas_and_seeds(gen):
    r = random.Random(30)
    checked = 0
    for i in range(60):
        schema = random_schema(r)
        for seed in (i, 1000 + i):
            res = gen.generate("Give me JSON.", json_schema=schema, seed=seed)
            value = json.loads(res.text)
            jsonschema.validate(value, schema)
            assert res.parsed == value and res.finished
            checked += 1
    assert checked == 120


def test_strings_hold_no_quote_backslash_or_control_and_respect_max_length(gen):
    schema = {"type": "array", "minItems": 4, "maxItems": 4, "items": {"type": "string", "maxLength": 6}}
    free = {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "string"}}
    for seed in range(8):
        for s in (schema, free):
            res = gen.generate("Strings, please.", json_schema=s, seed=seed)
            for hole in res.holes:
                assert not any(c in '"\\' or ord(c) < 0x20 for c in hole), hole
            if s is schema:
                assert all(len(v) <= 6 for v in res.parsed)


def test_numbers_have_no_leading_zeros_and_a_valid_sign_and_fraction(gen):
    import re

    schema = {"type": "array", "minItems": 6, "maxItems": 6, "items": {"type": "number"}}
    ints = {"type": "array", "minItems": 6, "maxItems": 6, "items": {"type": "integer"}}
    for seed in range(6):
        for s, pattern in ((schema, r"-?(0|[1-9][0-9]*)\.[0-9]+"), (ints, r"-?(0|[1-9][0-9]*)")):
            text = gen.generate("Numbers.", json_schema=s, seed=seed).text
            for item in text.strip("[]").split(","):
                assert re.fullmatch(pattern, item.strip()), (item, text)


def test_json_schema_and_template_together_are_refused(gen):
    with pytest.raises(DgportError, match="either json_schema or template"):
        gen.generate("x", json_schema={"type": "null"}, template=["a", Hole(2)])


def test_a_tokenizer_without_number_tokens_refuses_numbers_only(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dgport.tokenizer import ChatTokenizer
    from dgport.vocab_constraints import ConstraintError

    vocab = {"<pad>": 0, "<unk>": 1, '"': 2, "a": 3, "b": 4, **{str(d): 5 + d for d in range(10)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "tokenizer.json"))
    t = ChatTokenizer(tmp_path)
    assert compile_schema({"type": "string", "maxLength": 2}).layout(t).constraint is not None
    with pytest.raises(ConstraintError, match="no token for '-'"):
        compile_schema({"type": "integer"}).layout(t)
