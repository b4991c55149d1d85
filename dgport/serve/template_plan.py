"""Canvas templates on the server: the `template` field (both routes) and `/v1/completions` `suffix`
(in-filling), parsed, tokenized and checked on the planning thread.

The parts are tokenized in one batch call (`Template.layout`: tokenizers releases the GIL there), and
the Generator gets that Layout, so the worker never tokenizes the template again. With `suffix`,
the answer is the inserted text alone, as OpenAI's legacy completions return it (the client has the
prompt and the suffix)."""

from ..canvas_template import MAX_HOLE, MAX_PARTS, Layout, Template
from ..errors import DgportError
from .protocol import ApiError

PARTS = 'a part is a string (fixed text) or {"hole": N} (N positions the model fills, 1 to %d)' % MAX_HOLE


def plan_template(req, gen, think: bool) -> tuple[Layout, int] | None:
    """(the template's Layout, the max_new_tokens it runs: the whole canvases it spans) for a request
    with a `template` or a `suffix`; None for one with neither. Every refusal is a 400 naming its field."""
    suffix = getattr(req, "suffix", None)  # only /v1/completions has it
    if req.template is None and suffix is None:
        return None
    field = "template" if req.template is not None else "suffix"
    if req.template is not None and suffix is not None:
        raise ApiError(400, "template and suffix both give the answer's shape; send one of them (suffix S is "
                       'the template [{"hole": max_tokens}, S])', param="suffix")
    if think:
        raise ApiError(400, f"a {field} fixes the answer from its first position, where thinking mode's thought "
                       "channel would go; turn thinking off (reasoning_effort / chat_template_kwargs."
                       f"enable_thinking) or drop the {field}", param=field)
    if req.stop:
        raise ApiError(400, f"stop strings cannot be used with a {field}: the answer ends where the template "
                       "ends; drop stop", param="stop")
    C = gen.config.canvas_length
    cap_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    cap = req.max_completion_tokens or req.max_tokens
    try:
        if suffix is not None:
            if cap is not None and cap > MAX_HOLE:
                raise ApiError(400, f"{cap_name}={cap}: with suffix, {cap_name} is the in-fill's length (the hole "
                               f"before the suffix), at most {MAX_HOLE}", param=cap_name)
            template = Template.infill(suffix, cap or C)
        else:
            value = req.template
            if not isinstance(value, list) or not value:
                raise ApiError(400, f"template: must be a non-empty list of parts; {PARTS}", param="template")
            if len(value) > MAX_PARTS:
                raise ApiError(400, f"template: {len(value)} parts, more than {MAX_PARTS}", param="template")
            template = Template.from_json(value, "template")
        layout = template.layout(gen.tokenizer)
    except DgportError as e:  # TemplateError, or a part that is not UTF-8 text
        raise ApiError(400, str(e), param=field) from e
    if suffix is None and cap is not None and cap < layout.length:
        raise ApiError(400, f"the template needs {layout.length} tokens, more than {cap_name}={cap}; raise "
                       f"{cap_name} or leave it unset (the answer ends where the template ends)", param=cap_name)
    max_new = layout.check_budget(C, None)
    limit = gen.config.max_position_embeddings
    if max_new >= limit:  # the prompt needs at least one position
        raise ApiError(400, f"the {field} needs {layout.length} positions ({layout.canvases(C)} canvases of {C}), "
                       f"more than this model's context of {limit} leaves for the answer; shorten the {field}",
                       param=field, code="context_length_exceeded")
    try:
        gen.settings(max_new).validate()
    except DgportError as e:
        raise ApiError(400, f"{field}: {e}", param=field) from e
    return layout, max_new
