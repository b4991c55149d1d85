"""`dgport run --json-schema FILE`: the answer is JSON valid against the schema, token for token what
generate(json_schema=...) writes; a schema outside the subset is a usage error (exit 2) in one line
naming the keyword; contradicting flags are refused before any model loads."""
from __future__ import annotations

import json

import jsonschema
import pytest

import dgport
from cli_support import dg  # noqa: E402

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                           "population": {"type": "integer"}, "capital": {"type": "boolean"}},
          "required": ["city", "population"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny_gen(checkpoints):
    return dgport.load(checkpoints["tiny"], backend="cpu", threads=2)


def test_run_json_schema_answers_valid_json_like_the_api(capsys, tmp_path, checkpoints, tiny_gen):
    f = tmp_path / "city.json"
    f.write_text(json.dumps(SCHEMA))
    for seed in (0, 1):
        code, out, err = dg(capsys, "run", checkpoints["tiny"], "--prompt", "A city, please.", "--json-schema", f,
                            "--seed", seed, "--json")
        assert code == 0, err
        r = json.loads(out)
        jsonschema.validate(json.loads(r["text"]), SCHEMA)
        api = tiny_gen.generate("A city, please.", json_schema=SCHEMA, seed=seed)
        assert r["token_ids"] == api.token_ids[0] and r["text"] == api.text
    code, out, err = dg(capsys, "run", checkpoints["tiny"], "--prompt", "A city.", "--json-schema", f, "--seed", "3")
    assert code == 0, err
    jsonschema.validate(json.loads(out), SCHEMA)


@pytest.mark.parametrize("schema, says", [
    ({"type": "string", "pattern": "^a"}, "'pattern'"),
    ({"type": "object", "properties": {"d": {"type": "string", "format": "date"}}}, "'format'"),
    ({"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"}, "recursive"),
])
def test_a_schema_outside_the_subset_is_a_usage_error_naming_the_keyword(capsys, tmp_path, checkpoints, schema, says):
    f = tmp_path / "s.json"
    f.write_text(json.dumps(schema))
    code, out, err = dg(capsys, "run", checkpoints["tiny"], "--prompt", "x", "--json-schema", f)
    assert code == 2 and out == ""
    assert says in err and "--json-schema" in err and len(err.strip().splitlines()) == 1, err


def test_contradicting_flags_and_bad_files_are_refused(capsys, tmp_path, checkpoints):
    f = tmp_path / "s.json"
    f.write_text('{"type": "boolean"}')
    t = tmp_path / "t.txt"
    t.write_text("{{hole:2}}")
    for extra, says in ((["--template", t], "--template"), (["--suffix", "x"], "--suffix"),
                        (["--think"], "--think")):
        code, _, err = dg(capsys, "run", checkpoints["tiny"], "--prompt", "x", "--json-schema", f, *extra)
        assert code == 1 and says in err and "contradict" in err
    code, _, err = dg(capsys, "run", checkpoints["tiny"], "--prompt", "x", "--json-schema", tmp_path / "none.json")
    assert code == 1 and "cannot read it" in err
    (tmp_path / "bad.json").write_text("{nope")
    code, _, err = dg(capsys, "run", checkpoints["tiny"], "--prompt", "x", "--json-schema", tmp_path / "bad.json")
    assert code == 2 and "not valid JSON" in err
