"""JSON schemas compiled into canvas templates (docs/structured-output.md).

A schema of the supported subset becomes a `Template`: braces, keys, quotes, commas and constants are
fixed text; each value is a constrained hole (dgport.vocab_constraints), so the answer parses and
validates whatever the weights write. A keyword outside the subset is refused in one line naming it and
where it is (never ignored); so is a schema too big or too deep.

The subset:
- objects: `properties` (written in declared order, every one of them: an optional property is written
  too, which validates), `required` (names among `properties`), `additionalProperties` (true or false:
  no other property is ever written);
- arrays: `items` (one schema), `minItems`, `maxItems`: exactly clamp(DEFAULT_ITEMS, minItems, maxItems)
  items;
- strings: `maxLength` (a hole of maxLength one-character positions), otherwise a hole of
  DEFAULT_STRING_TOKENS tokens; `enum`;
- integers (up to INTEGER_DIGITS digits, a sign), numbers (up to NUMBER_DIGITS digits, a point and 1 to
  FRACTION_DIGITS decimals), booleans, null;
- `enum` and `const` of any JSON values; `type` lists with "null" (a boolean or enum also may be null;
  a nullable string, number, integer, array or object is written as its non-null type);
- `$ref` to `#/$defs/NAME` or `#/definitions/NAME` (not recursive);
- annotations, accepted and unused: title, description, $schema, $id, $comment, default, examples,
  deprecated, readOnly, writeOnly.
"""
from __future__ import annotations

import json

from .canvas_template import Hole, Template
from .errors import DgportError
from .vocab_constraints import Choice, FractionDigits, IntegerDigits, StringChars

DEFAULT_STRING_TOKENS = 24
MAX_STRING_LENGTH = 4096  # maxLength above this is refused (a hole that long is no use to a canvas)
INTEGER_DIGITS = 6
NUMBER_DIGITS = 4
FRACTION_DIGITS = 4
DEFAULT_ITEMS = 3
MAX_ITEMS = 64
MAX_DEPTH = 16  # nesting of schemas (objects, arrays, $ref)
MAX_PARTS = 20_000  # template parts the schema compiles to
MAX_ENUM = 256
MAX_SCHEMA_BYTES = 1 << 20

ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated",
               "readOnly", "writeOnly"}
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
KEYWORDS = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"maxLength"},
    "integer": set(), "number": set(), "boolean": set(), "null": set(),
}
COMMON = {"type", "enum", "const", "$ref", "$defs", "definitions"} | ANNOTATIONS


class SchemaError(DgportError):
    """A schema outside the supported subset (the message names the keyword and where it is)."""


def _where(path: str) -> str:
    return path or "the schema's root"


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


class _Compiler:
    def __init__(self, root: dict, dialect: str = "json"):
        self.root = root
        self.parts: list = []
        self.refs: list[str] = []
        self.gemma = dialect == "gemma"  # Gemma 4's tool-call syntax: <|"|>strings<|"|>, {key:value,...}
        self.quote = '<|"|>' if self.gemma else '"'
        self.sep = "," if self.gemma else ", "

    def literal(self, value) -> str:
        if self.gemma:
            from .tool_calls import ToolError, gemma_dumps

            try:
                return gemma_dumps(value)
            except ToolError as e:
                raise SchemaError(str(e)) from None
        return _dumps(value)

    def emit(self, part) -> None:
        if isinstance(part, str) and self.parts and isinstance(self.parts[-1], str):
            self.parts[-1] += part
        else:
            self.parts.append(part)
        if len(self.parts) > MAX_PARTS:
            raise SchemaError(f"the schema compiles to more than {MAX_PARTS} parts; make it smaller "
                              "(fewer properties, fewer or smaller array items)")

    def value(self, schema, path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise SchemaError(f"{_where(path)}: the schema is nested more than {MAX_DEPTH} levels deep")
        if isinstance(schema, bool) or not isinstance(schema, dict):
            raise SchemaError(f"{_where(path)}: a schema here must be a JSON object (boolean schemas are not supported)")
        if "$ref" in schema:
            return self.ref(schema, path, depth)
        for key in schema:
            if key not in COMMON and not any(key in k for k in KEYWORDS.values()):
                raise SchemaError(f"{_where(path)}: keyword {str(key)[:60]!r} is not in the subset dgport enforces "
                                  "(docs/structured-output.md); remove it or change the schema")
        types = self.types(schema, path)
        for key in schema:
            if key not in COMMON.union(*(KEYWORDS[t] for t in types)):
                raise SchemaError(f"{_where(path)}: keyword {key!r} does not apply to type {'/'.join(types)}; "
                                  "remove it or change the schema")
        if ("$defs" in schema or "definitions" in schema) and schema is not self.root:
            raise SchemaError(f"{_where(path)}: $defs/definitions are read only at the schema's root")
        if "const" in schema:
            return self.emit(self.literal(self.check_member(schema["const"], types, f"{path}.const")))
        if "enum" in schema:
            return self.enum(schema["enum"], types, path)
        kinds = [t for t in types if t != "null"]
        if not kinds:
            return self.emit("null")
        if len(kinds) > 1:
            raise SchemaError(f"{_where(path)}: type {types}: a union of several non-null types is not supported")
        kind = kinds[0]
        if kind == "boolean":
            return self.emit(Hole(1, Choice(("true", "false", "null") if "null" in types else ("true", "false"))))
        if kind == "integer":
            return self.emit(Hole(1 + INTEGER_DIGITS, IntegerDigits()))
        if kind == "number":
            self.emit(Hole(1 + NUMBER_DIGITS, IntegerDigits()))
            self.emit(".")
            return self.emit(Hole(FRACTION_DIGITS, FractionDigits()))
        if kind == "string":
            return self.string(schema, path)
        if kind == "array":
            return self.array(schema, path, depth)
        return self.object(schema, path, depth)

    def types(self, schema: dict, path: str) -> list[str]:
        t = schema.get("type")
        if t is None:
            if "properties" in schema:
                return ["object"]
            if "items" in schema:
                return ["array"]
            if "enum" in schema or "const" in schema:
                return list(TYPES)
            raise SchemaError(f"{_where(path)}: no 'type' (or enum/const); say what this value is")
        types = [t] if isinstance(t, str) else t
        if not isinstance(types, list) or not types or not all(isinstance(x, str) and x in TYPES for x in types) \
                or len(set(types)) != len(types):
            raise SchemaError(f"{_where(path)}.type: {t!r} is not a type or a list of distinct types among "
                              f"{', '.join(TYPES)}")
        return types

    def ref(self, schema: dict, path: str, depth: int) -> None:
        ref = schema["$ref"]
        extra = set(schema) - {"$ref"} - ANNOTATIONS - ({"$defs", "definitions"} if schema is self.root else set())
        if extra:
            raise SchemaError(f"{_where(path)}: keyword {sorted(extra)[0]!r} beside $ref is not supported")
        for prefix in ("#/$defs/", "#/definitions/"):
            if isinstance(ref, str) and ref.startswith(prefix) and "/" not in ref[len(prefix):]:
                defs = self.root.get(prefix[2:-1])
                name = ref[len(prefix):]
                if not isinstance(defs, dict) or name not in defs:
                    raise SchemaError(f"{_where(path)}.$ref: {ref!r} names no definition in the schema")
                if ref in self.refs:
                    raise SchemaError(f"{_where(path)}.$ref: {ref!r} is recursive; recursive $ref is not supported")
                self.refs.append(ref)
                try:
                    return self.value(defs[name], f"{path}.$ref({name})", depth + 1)
                finally:
                    self.refs.pop()
        raise SchemaError(f"{_where(path)}.$ref: {str(ref)[:80]!r}: only '#/$defs/NAME' and '#/definitions/NAME' "
                          "are supported")

    def check_member(self, value, types: list[str], path: str):
        kind = _json_type(value, path)
        if kind not in types and not (kind == "integer" and "number" in types):
            raise SchemaError(f"{path}: {_dumps(value)[:60]} is not of type {'/'.join(types)}")
        return value

    def enum(self, members, types: list[str], path: str) -> None:
        if not isinstance(members, list) or not members or len(members) > MAX_ENUM:
            raise SchemaError(f"{path}.enum: a list of 1 to {MAX_ENUM} values")
        texts = list(dict.fromkeys(self.literal(self.check_member(m, types, f"{path}.enum")) for m in members))
        self.emit(texts[0] if len(texts) == 1 else Hole(1, Choice(tuple(texts))))

    def string(self, schema: dict, path: str) -> None:
        n = schema.get("maxLength")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_STRING_LENGTH):
            raise SchemaError(f"{path}.maxLength: an integer from 0 to {MAX_STRING_LENGTH} (got {n!r})")
        self.emit(self.quote)
        if n is None:
            self.emit(Hole(DEFAULT_STRING_TOKENS, StringChars(one_char=False)))
        elif n:
            self.emit(Hole(n, StringChars(one_char=True)))
        self.emit(self.quote)

    def array(self, schema: dict, path: str, depth: int) -> None:
        lo, hi = schema.get("minItems", 0), schema.get("maxItems", MAX_ITEMS)
        for key, v in (("minItems", lo), ("maxItems", hi)):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_ITEMS:
                raise SchemaError(f"{path}.{key}: an integer from 0 to {MAX_ITEMS} (got {v!r})")
        if lo > hi:
            raise SchemaError(f"{_where(path)}: minItems {lo} is more than maxItems {hi}")
        count = min(max(DEFAULT_ITEMS, lo), hi)
        if count and "items" not in schema:
            raise SchemaError(f"{_where(path)}: an array needs 'items' (one schema for every item)")
        self.emit("[")
        for i in range(count):
            if i:
                self.emit(self.sep)
            self.value(schema["items"], f"{path}[{i}]", depth + 1)
        self.emit("]")

    def object(self, schema: dict, path: str, depth: int) -> None:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise SchemaError(f"{path}.properties: must be an object of property schemas")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{path}.required: must be a list of property names")
        missing = [r for r in required if r not in props]
        if missing:
            raise SchemaError(f"{path}.required: {missing[0]!r} has no schema in properties, so dgport cannot "
                              "write it")
        extra = schema.get("additionalProperties", True)
        if not isinstance(extra, bool):
            raise SchemaError(f"{path}.additionalProperties: only true or false are supported (dgport writes only "
                              "the listed properties)")
        self.emit("{")
        for i, (name, sub) in enumerate(props.items()):
            if self.gemma:
                from .tool_calls import gemma_key

                self.emit(("," if i else "") + gemma_key(name) + ":")
            else:
                self.emit((", " if i else "") + _dumps(name) + ": ")
            self.value(sub, f"{path}.{name}", depth + 1)
        self.emit("}")


def _json_type(value, path: str) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise SchemaError(f"{path}: {value} is not a JSON number")
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise SchemaError(f"{path}: a {type(value).__name__} is not a JSON value")


def compile_schema(schema, dialect: str = "json") -> Template:
    """The canvas template whose every completion is a JSON text valid against `schema` (a dict, or
    its JSON text). Refuses, in one line, what is outside the subset (module docstring). dialect
    "gemma": the value in Gemma 4's tool-call syntax instead (dgport.tool_calls)."""
    if isinstance(schema, (str, bytes)):
        if len(schema) > MAX_SCHEMA_BYTES:
            raise SchemaError(f"the schema is over {MAX_SCHEMA_BYTES >> 20} MiB")
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError) as e:
            raise SchemaError(f"the schema is not valid JSON ({str(e).splitlines()[0][:80]})") from None
    try:
        c = _Compiler(schema if isinstance(schema, dict) else {}, dialect)
        c.value(schema, "", 0)
    except RecursionError:
        raise SchemaError(f"the schema is nested too deeply (at most {MAX_DEPTH} levels)") from None
    return Template(c.parts)


def parse_answer(text: str):
    """The JSON value of a schema-constrained answer (its text always parses)."""
    return json.loads(text)
