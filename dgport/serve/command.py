"""The `dgport serve` command: options, start-up checks, and `main` with the CLI's one-line errors."""

import click

from ..errors import DgportError
from .app import ServeConfig, create_app, export_fingerprint


@click.command("serve")
@click.argument("model", required=False)
@click.option("--backend", type=click.Choice(("cpu", "cuda", "mlx", "torch")), default="cpu", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the server to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="DGPORT_API_KEY",
              help="Require `Authorization: Bearer KEY` on /v1 (also from DGPORT_API_KEY).")
@click.option("--max-queue", type=click.IntRange(1, 100_000), default=16, show_default=True,
              help="Requests that may wait behind the running one; more get 503 with Retry-After.")
@click.option("--served-model-name", default=None, help="The model id clients send (default: MODEL).")
def serve(model, backend, host, port, api_key, max_queue, served_model_name):
    """An OpenAI-compatible API (chat, completions, models) for MODEL: an export folder, a Hugging Face
    checkpoint folder or a Hub id (default: the shipped Sudoku model)."""
    try:
        import uvicorn
    except ImportError as e:
        raise DgportError("dgport serve needs fastapi and uvicorn: pip install 'dgport[serve]'") from e
    from .. import load

    if api_key is not None and not api_key.strip():
        raise DgportError("--api-key is empty; give a key or leave the option out")
    _check_listen(host, port)  # before loading a model that could take minutes
    if model is None:
        from ..default_model import ensure_default_export

        path, model_id = ensure_default_export(backend), "sudoku"
    else:
        from ..resolve import resolve_model

        path, model_id = resolve_model(model, backend), model
    cfg = ServeConfig(model_id=served_model_name or model_id, backend=backend,
                      fingerprint=export_fingerprint(path, backend), api_key=api_key)
    app = create_app(lambda: load(path, backend=backend), cfg, max_queue=max_queue)
    local = host in ("127.0.0.1", "localhost", "::1")
    where = f"[{host}]" if ":" in host else host
    key = "API key required" if api_key else "no API key" + ("" if local else ": anyone who can reach it can use it")
    click.echo(f"dgport serve: {cfg.model_id} on {backend}, http://{where}:{port}/v1 "
               f"({'this machine only' if local else 'reachable from other machines'}); {key}; "
               f"up to {max_queue} waiting requests", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)



def _check_listen(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DgportError(f"--host {host}: not an address of this machine ({e.strerror})") from e
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            raise DgportError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port "
                              "or stop what uses it") from e


def main(argv=None) -> int:
    """`python -m dgport.serve MODEL ...`: the command with the CLI's one-line errors."""
    try:
        serve.main(args=argv, prog_name="dgport serve", standalone_mode=False)
    except click.exceptions.UsageError as e:
        click.echo(f"dgport: error: {e.format_message()}", err=True)
        return 2
    except DgportError as e:
        click.echo(f"dgport: error: {e}", err=True)
        return 1
    except (KeyboardInterrupt, click.exceptions.Abort):
        return 130
    return 0
