"""The `dgport serve` command: options, start-up checks, and `main` with the CLI's one-line errors.

Everything given is checked before the model loads (which can take minutes): the API key, the
served name, the --allow-host names, and the address, which is bound here and handed to uvicorn (no
other program can take the port in between). SIGTERM and Ctrl-C shut down gracefully (see app.py);
after SIGTERM the process exits 0."""

import os
import threading
from pathlib import Path

import click

from ..errors import DgportError
from .app import ServeConfig, create_app, export_fingerprint
from .guard import allow_host_option, allowed_hosts

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# requests denoised together by default: the best measured on a 2-core CPU, never measurably slower than 1
# (bench/bench_serve_batch.py; docs/serving.md, bench/RESULTS.md 2026-12-06)
DEFAULT_MAX_BATCH = 4


def _set_debug(ctx, param, value):
    if value:
        os.environ["DGPORT_DEBUG"] = "1"  # read by both error handlers (this main's and the CLI's)
    return value


def _log_requests() -> None:
    """One line per request on stderr (access_log.py); with --debug, tracebacks of failed generations."""
    import logging

    log = logging.getLogger("dgport.serve")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("dgport serve: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if os.environ.get("DGPORT_DEBUG") else logging.INFO)
    log.propagate = False


@click.command("serve")
@click.argument("model", required=False)
@click.option("--backend", type=click.Choice(("cpu", "cuda", "mlx", "torch")), default="cpu", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 (or ::) binds every interface: other machines can reach it.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="DGPORT_API_KEY",
              help="Require `Authorization: Bearer KEY` on /v1 (also from DGPORT_API_KEY): printable ASCII, "
                   "no spaces.")
@click.option("--max-queue", type=click.IntRange(1, 100_000), default=16, show_default=True,
              help="Requests that may wait behind a full batch; more get 503 with Retry-After.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=DEFAULT_MAX_BATCH, show_default=True,
              help="Requests denoised together (continuous batching: new ones join between denoising steps); "
                   "1 runs them one at a time.")
@click.option("--served-model-name", default=None,
              help="The model id clients send (default: the model folder's name, or the Hub id).")
@click.option("--allow-host", "allow_host", multiple=True, callback=allow_host_option, metavar="NAME",
              help="Also accept requests whose Host header is NAME (repeatable; localhost, IP addresses and "
                   "the --host name are always accepted; '*' accepts any Host).")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Show the traceback of an error at start, and of a failed generation in the log.")
@click.pass_context
def serve(ctx, model, backend, host, port, api_key, max_queue, max_batch, served_model_name, allow_host):
    """An OpenAI-compatible API (chat, completions, models) for MODEL: an export folder, a Hugging Face
    checkpoint folder or a Hub id (default: the shipped Sudoku model)."""
    try:
        import uvicorn
    except ImportError as e:
        raise DgportError("dgport serve needs fastapi and uvicorn: pip install 'dgport[serve]'") from e
    from click.core import ParameterSource

    from .. import load

    from_env = ctx.get_parameter_source("api_key") is ParameterSource.ENVIRONMENT
    _check_key(api_key, "DGPORT_API_KEY" if from_env else "--api-key")
    if served_model_name is not None and (not served_model_name.strip() or served_model_name != served_model_name.strip()
                                          or not served_model_name.isprintable()):
        raise DgportError(f"--served-model-name {served_model_name!r}: give a name without leading or trailing "
                          "spaces or control characters")
    hosts = allowed_hosts(host, allow_host)
    sock = _check_listen(host, port)  # before loading a model that could take minutes
    try:
        if model is None:
            from ..default_model import ensure_default_export

            path = ensure_default_export(backend)
        else:
            from ..resolve import resolve_model

            path = resolve_model(model, backend)
        cfg = ServeConfig(model_id=served_name(model, served_model_name), backend=backend,
                          fingerprint=export_fingerprint(path, backend), api_key=api_key, allowed_hosts=hosts,
                          private_paths=_private_paths(model, path))
        app = create_app(lambda: load(path, backend=backend), cfg, max_queue=max_queue, max_batch=max_batch)
    except BaseException:
        sock.close()
        raise
    local = host in LOCAL_HOSTS
    where = f"[{host}]" if ":" in host else host
    key = "API key required" if api_key else "no API key" + ("" if local else ": anyone who can reach it can use it")
    names = ("any Host header" if hosts is None else
             "Host: localhost, IP addresses" + "".join(f", {n}" for n in sorted(hosts)))
    click.echo(f"dgport serve: {cfg.model_id} on {backend}, http://{where}:{port}/v1 "
               f"({'this machine only' if local else 'reachable from other machines'}); {key}; "
               f"{max_batch} request{'s' if max_batch != 1 else ''} at a time, up to {max_queue} waiting; {names}",
               err=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # at once, not after the open connections end: what waits gets a 503, streams an error event
            loop = getattr(app.state, "loop", None)
            if loop is not None and not self.should_exit:
                loop.call_soon_threadsafe(app.state.shutdown)
            super().handle_exit(sig, frame)

    _log_requests()
    if threading.current_thread() is threading.main_thread():
        import signal

        # uvicorn re-raises the signal once it has shut down; a graceful SIGTERM exit is exit status 0
        signal.signal(signal.SIGTERM, lambda *_: None)
    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


def served_name(model, served_model_name) -> str:
    """The model id clients send: --served-model-name, else the model folder's name (never its path),
    the Hub id as given, or `sudoku` for the shipped model."""
    if served_model_name is not None:
        return served_model_name
    if model is None:
        return "sudoku"
    from ..resolve import is_hub_id

    path = Path(model).expanduser()
    if not path.exists() and is_hub_id(str(model)):
        return str(model)
    return path.resolve().name or "model"


def _private_paths(model, path) -> tuple:
    """Folders whose names may show in a response but not their place on this machine."""
    from ..default_model import cache_dir
    from ..resolve import hub_cache_dir

    out = [Path.home(), cache_dir(), hub_cache_dir()]
    for p in ([Path(model).expanduser()] if model is not None else []) + [Path(path)]:
        out += [p, Path(os.path.abspath(p)), p.resolve()]
    return tuple(str(p) for p in out if p.is_absolute())


def _check_key(key: str | None, source: str) -> None:
    if key is None:
        return
    if not key.strip():
        raise DgportError(f"{source} is empty; give a key or leave the option out")
    if key != key.strip():
        raise DgportError(f"{source} has leading or trailing whitespace; remove it (clients send the key "
                          "without it)")
    if not all(33 <= ord(c) <= 126 for c in key):
        raise DgportError(f"{source} must be printable ASCII without spaces (it travels in an HTTP header)")


def _check_listen(host: str, port: int):
    """The socket the server will listen on, bound now (uvicorn gets it)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DgportError(f"--host {host}: not an address of this machine ({e.strerror})") from e
    family, kind, proto, _, addr = infos[0]
    s = socket.socket(family, kind, proto)  # proto: IPPROTO_TCP, so asyncio sets TCP_NODELAY on its connections
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        s.bind(addr)
    except OSError as e:
        s.close()
        raise DgportError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port "
                          "or stop what uses it") from e
    return s


def _error(message) -> None:
    from ..display import terminal_text

    click.echo(f"dgport: error: {terminal_text(' '.join(str(message).split()))}", err=True)


def main(argv=None) -> int:
    """`python -m dgport.serve MODEL ...`: the command with the CLI's one-line errors (DGPORT_DEBUG=1
    re-raises an unexpected one with its traceback)."""
    try:
        code = serve.main(args=argv, prog_name="dgport serve", standalone_mode=False)
    except click.exceptions.UsageError as e:
        _error(e.format_message())
        return 2
    except DgportError as e:
        _error(e)
        return 1
    except (KeyboardInterrupt, click.exceptions.Abort):
        return 130
    except OSError as e:
        _error(f"{e.filename + ': ' if isinstance(e.filename, str) else ''}{e.strerror or e}")
        return 1
    except Exception as e:  # a runtime's load error or a bug: one line
        if os.environ.get("DGPORT_DEBUG"):
            raise
        _error(f"{e.__class__.__name__}: {e} (set DGPORT_DEBUG=1 for the traceback)")
        return 1
    return code if isinstance(code, int) else 0
