"""`dgport serve`: an OpenAI-compatible HTTP API over one model (FastAPI on uvicorn).

One worker thread owns the Generator and runs requests one after another, in arrival order, from a
bounded queue (full: 503 with Retry-After). Handlers hand a Job to the worker and read its events
from an asyncio queue the worker fills through `loop.call_soon_threadsafe`. A client that goes away
sets its job's cancel event; the worker checks it between two denoising steps.

Cache reuse. The worker remembers the token ids whose K/V the backend's cache holds (the last
prompt and every canvas but the last). A request whose prompt ids start with exactly those ids
encodes only the rest. A chat request that repeats the last conversation, its answer exactly as
returned, and adds turns is continued as `dgport chat` continues one (templates rewrite history, e.g.
drop the thought channel, so the re-rendered conversation rarely starts with the cached ids): the
model's own answer tokens, the template's turn close, then the new turns. Either way the request
runs on the token stream it reports (`prompt_token_ids`), as a fresh run of that stream would.

max_tokens (or max_completion_tokens) is a hard cap on the answer: the model runs the whole canvases
that cover it (canvas_length tokens each), and the text, token_ids and usage.completion_tokens are
cut to max_tokens tokens, with finish_reason "length" when the cut removed any.

Sampling fields. DiffusionGemma samples each step at a temperature the schedule t_max -> t_min sets
(over max_denoising_steps) and keeps the tokens an entropy budget accepts; there is no per-token
temperature or nucleus to map OpenAI's `temperature` and `top_p` onto. They are accepted only at
their neutral values (null or 1), anything else is refused with a 400 that names t_min / t_max;
the sampler's own settings are body fields (`max_denoising_steps`, `t_min`, `t_max`,
`entropy_bound`, `stability_threshold`, `confidence_threshold`). Fields that would change the answer
and that dgport cannot honour (logprobs, penalties, n > 1...) get a 400; `response_format` with a
JSON schema (serve/schema_plan.py) and `tools` (serve/tool_plan.py) are honoured, `json_object` refused.

Modules, one job each: protocol (errors in OpenAI's shape, request bodies), plan (a request -> the
checked, tokenized Plan), engine (the worker thread, the cache reuse, shutdown), text (channels, stop
strings, deltas), template_plan / schema_plan / tool_plan (canvas templates, response_format and tools
planned into the Plan), guard (the Host check, the API key, JSON-only bodies), app (the ASGI app: routes,
SSE, the thread pools that keep CPU work off the event loop), command (the click command and `main`).
Importing the package needs only click: pydantic, fastapi and uvicorn are imported on first use.
"""

from .app import ServeConfig, create_app, export_fingerprint
from .command import main, serve
from .engine import CacheState, Engine, Job
from .plan import Plan, plan_chat, plan_completion
from .protocol import ApiError, error_body
from .text import TextStream

__all__ = ["ApiError", "CacheState", "Engine", "Job", "Plan", "ServeConfig", "TextStream", "create_app",
           "error_body", "export_fingerprint", "main", "plan_chat", "plan_completion", "serve"]
