"""`dgport web`: the browser page and an export, served from this machine (dgport/web.py)."""
from __future__ import annotations

from pathlib import Path

import click

from .cli import _resolve, cli, debug_option
from .serve.guard import allow_host_option


@cli.command()
@click.argument("export_dir", metavar="[EXPORT]", required=False, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 (or ::) binds every interface: other machines can load the page.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--allow-host", "allow_host", multiple=True, callback=allow_host_option, metavar="NAME",
              help="Also answer requests whose Host header is NAME (repeatable; localhost and IP addresses always; "
                   "'*' any).")
@click.option("--save", "save_dir", default=None, type=click.Path(path_type=Path), metavar="DIR",
              help="Write the page and the export into DIR (a new folder) for any static web server, instead of "
                   "serving them (docs/web.md).")
@debug_option
def web(export_dir, host, port, allow_host, save_dir):
    """Run EXPORT in the browser: serve a page that generates with onnxruntime-web and dgport's step loop in
    JavaScript, token-identical to `dgport run` for the same seed. EXPORT is an fp32 or fp16 ONNX export, a
    checkpoint folder or a Hub id (exported once into dgport's cache); default: the shipped Sudoku model."""
    from . import web as page
    from .serve.guard import allowed_hosts

    path, _ = _resolve(export_dir, "cpu")
    export = page.web_export(path)
    if save_dir is not None:
        page.save_site(export, save_dir)
        click.echo(f"dgport web: wrote the page and {export.path.name} to {save_dir}; serve it with the headers in "
                   f"{save_dir / '_headers'} (docs/web.md)", err=True)
        return
    page.serve_page(export, host, port, allowed_hosts(host, allow_host), lambda m: click.echo(m, err=True))
