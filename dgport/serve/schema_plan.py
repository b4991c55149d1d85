"""`response_format` on /v1/chat/completions: {"type": "json_schema", "json_schema": {"name", "schema",
"strict", "description"}} compiles the schema into a canvas template with constrained holes
(dgport.json_schema), planned like the `template` field on the planning thread; {"type": "text"} is the
default; {"type": "json_object"} is refused (a schema is needed: dgport writes JSON by construction only
from a schema). Every refusal is a 400 naming the field."""

from ..errors import DgportError
from .protocol import ApiError

FIELD = "response_format"


def plan_response_format(req, gen, think: bool):
    """(the compiled template's Layout, the max_new_tokens it runs) for a json_schema response_format,
    None for none or {"type": "text"}."""
    from ..json_schema import compile_schema

    fmt = req.response_format
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise ApiError(400, 'response_format: an object with "type": "text", "json_schema" or "json_object"',
                       param=FIELD)
    kind = fmt["type"]
    if kind == "text" and set(fmt) == {"type"}:
        return None
    if kind == "json_object":
        raise ApiError(400, 'response_format {"type": "json_object"} is not supported: dgport writes valid JSON by '
                       'construction from a schema; send {"type": "json_schema", "json_schema": {"name": ..., '
                       '"schema": {...}}}', param=f"{FIELD}.type")
    if kind != "json_schema" or set(fmt) != {"type", "json_schema"}:
        raise ApiError(400, f'response_format: type {kind!r} with fields {sorted(fmt)}; send {{"type": "json_schema", '
                       '"json_schema": {...}}} or {"type": "text"}', param=FIELD)
    spec = fmt["json_schema"]
    if not isinstance(spec, dict) or "schema" not in spec:
        raise ApiError(400, 'response_format.json_schema: an object with "schema" (and "name", "strict", '
                       '"description")', param=f"{FIELD}.json_schema")
    unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if unknown:
        raise ApiError(400, f"response_format.json_schema.{unknown[0]} is not supported; remove it",
                       param=f"{FIELD}.json_schema.{unknown[0]}")
    if not isinstance(spec.get("strict", False), (bool, type(None))) or not isinstance(spec.get("name", ""), str):
        raise ApiError(400, "response_format.json_schema: strict is true or false, name a string",
                       param=f"{FIELD}.json_schema")
    if req.template is not None:
        raise ApiError(400, "template and response_format both give the answer's shape; send one of them",
                       param="template")
    if think:
        raise ApiError(400, "response_format fixes the answer from its first position, where thinking mode's "
                       "thought channel would go; turn thinking off or drop response_format", param=FIELD)
    if req.stop:
        raise ApiError(400, "stop strings cannot be used with response_format: the answer ends where the JSON "
                       "ends; drop stop", param="stop")
    C = gen.config.canvas_length
    try:
        layout = compile_schema(spec["schema"]).layout(gen.tokenizer)
    except DgportError as e:  # SchemaError, TemplateError, ConstraintError
        raise ApiError(400, f"response_format.json_schema.schema: {e}", param=f"{FIELD}.json_schema.schema") from e
    cap_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    cap = req.max_completion_tokens or req.max_tokens
    if cap is not None and cap < layout.length:
        raise ApiError(400, f"the schema's answer needs {layout.length} tokens, more than {cap_name}={cap}; raise "
                       f"{cap_name} or leave it unset", param=cap_name)
    max_new = layout.check_budget(C, None)
    if max_new >= gen.config.max_position_embeddings:
        raise ApiError(400, f"the schema's answer needs {layout.length} positions, more than this model's context "
                       "leaves; make the schema smaller", param=FIELD, code="context_length_exceeded")
    try:
        gen.settings(max_new).validate()
    except DgportError as e:
        raise ApiError(400, f"response_format: {e}", param=FIELD) from e
    return layout, max_new
