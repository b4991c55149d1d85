"""`dgport web`: the browser page (web/) and one ONNX export, served from this machine.

The page runs the export entirely in the browser (onnxruntime-web, WebAssembly) with the JavaScript
twin of the step loop. The server only hands out files: the page's own (shipped in the package as
`dgport.web_page`, with onnxruntime-web's wasm gzipped) and the export's, the ones its manifest
lists. Every response carries the two headers that make the page cross-origin isolated
(`Cross-Origin-Opener-Policy: same-origin`, `Cross-Origin-Embedder-Policy: require-corp`), which
WebAssembly threads need. The Host header is checked as `dgport serve` checks it (DNS rebinding).

`save_site` writes the same files into a folder for any static web server (docs/web.md)."""
from __future__ import annotations

import gzip
import http.server
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

from . import safe_files
from .errors import DgportError, ExportError

WEB_DTYPES = ("fp32", "fp16")  # onnxruntime-web has no bf16 tensors
MAX_WEB_WEIGHTS = 1 << 30  # the page's own limit (web/src/browser.js): weights live in wasm once per session
ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".json": "application/json", ".wasm": "application/wasm", ".onnx": "application/octet-stream",
         ".bin": "application/octet-stream"}
PAGE_FILES = ("index.html", "app.js", "view.js", "style.css")
VENDOR_FILES = ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm.gz", "tokenizers.min.mjs", "jinja.mjs")


def page_dir() -> Path:
    from . import web_page

    return Path(web_page.__file__).resolve().parent


def page_files() -> dict[str, tuple[Path, bool]]:
    """URL path -> (file, gzipped) of every file the page needs; refuses an installation that lacks one."""
    root = page_dir()
    files = {f"/{name}": (root / name, False) for name in PAGE_FILES}
    files.update({f"/src/{p.name}": (p, False) for p in sorted((root / "src").glob("*.js"))})
    for name in VENDOR_FILES:
        url = f"/vendor/{name[:-3]}" if name.endswith(".gz") else f"/vendor/{name}"
        files[url] = (root / "vendor" / name, name.endswith(".gz"))
    missing = [str(p) for p, _ in files.values() if not p.is_file()]
    if missing or len([u for u in files if u.startswith("/src/")]) == 0:
        raise DgportError(f"the page's files are missing from this installation ({', '.join(missing) or root / 'src'}); "
                          "reinstall dgport (from a source checkout: npm --prefix web ci && npm --prefix web run vendor)")
    files["/"] = files["/index.html"]
    return files


def web_export(path: Path):
    """The export at `path`, checked for what the page can run: ONNX, fp32 or fp16, weights under 1 GiB."""
    from .manifest import open_export

    export = open_export(path, "cpu")
    entry = export.format("onnx")
    if entry["dtype"] not in WEB_DTYPES:
        raise ExportError(f"{path}: a {entry['dtype']} export; the browser runs fp32 and fp16 exports (onnxruntime-web "
                          "has no bf16 tensors): export with --dtype fp32 or --dtype fp16")
    weights = export.manifest["artifacts"][entry["weights"]["file"]]["size"]
    if weights > MAX_WEB_WEIGHTS:
        raise ExportError(f"{path}: {weights / 2**30:.1f} GiB of weights; a browser tab holds at most 1 GiB "
                          "(WebAssembly's 4 GiB, once per session): run it with dgport run, or export a smaller model")
    return export


def export_files(export) -> dict[str, Path]:
    """URL path -> file of the export's manifest and every file it lists."""
    names = ["dgport.json", *export.manifest["artifacts"]]
    return {f"/model/{name}": export.file(name) for name in names}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the page fetches a dozen files

    def version_string(self) -> str:
        return "dgport-web"
    files: dict = {}  # set per server: URL path -> (file, gzipped, root)
    allowed = None  # the Host check's names (dgport.serve.guard)

    def do_HEAD(self):
        self.do_GET(body=False)

    def do_GET(self, body=True):
        from .serve.guard import host_allowed

        if not host_allowed(self.headers.get("Host", ""), self.allowed):
            return self.reply(421, "this server answers only to its own host names; see dgport web --allow-host")
        path = unquote(urlsplit(self.path).path)
        if path == "/health":  # for scripts that wait until the page can be loaded
            return self.reply(200, '{"status": "ok"}', "application/json")
        entry = self.files.get(path)
        if entry is None:
            return self.reply(404, "not found")
        file, gzipped, root = entry
        try:
            with safe_files.open_binary(file, root, ExportError, "export again") as f:
                size = os.fstat(f.fileno()).st_size
                plain = gzipped and "gzip" not in self.headers.get("Accept-Encoding", "")
                data = gzip.decompress(f.read()) if plain else None
                self.send_response(200)
                self.send_header("Content-Type", TYPES.get(Path(path).suffix, "text/html; charset=utf-8"))
                self.send_header("Content-Length", str(len(data) if plain else size))
                if gzipped and not plain:
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("X-Content-Type-Options", "nosniff")
                for k, v in ISOLATION.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data) if plain else shutil.copyfileobj(f, self.wfile, safe_files.CHUNK)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except ExportError as e:
            self.reply(500, str(e))

    def reply(self, code: int, message: str, kind: str = "text/plain; charset=utf-8"):
        data = (message + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for k, v in ISOLATION.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):
        from .display import terminal_text

        sys.stderr.write(f"dgport web: {terminal_text(format % args)}\n")


def routes(export) -> dict:
    root = Path(os.path.realpath(export.path))
    page_root = page_dir()
    table = {url: (p, gz, page_root) for url, (p, gz) in page_files().items()}
    table.update({url: (p, False, root) for url, p in export_files(export).items()})
    return table


def serve_page(export, host: str, port: int, allowed, echo) -> None:
    """Serve until Ctrl-C or SIGTERM (which ends it cleanly)."""
    handler = type("WebHandler", (Handler,), {"files": routes(export), "allowed": allowed})

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        server = Server((host, port), handler)
    except OSError as e:
        raise DgportError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or stop what "
                          "uses it") from e
    where = f"[{host}]" if ":" in host else host
    local = host in ("127.0.0.1", "localhost", "::1")
    echo(f"dgport web: {export.path.name} at http://{where}:{port}/ "
         f"({'this machine only' if local else 'reachable from other machines'}); Ctrl-C stops")
    previous = signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start()) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


SITE_HEADERS = "/*\n" + "".join(f"  {k}: {v}\n" for k, v in ISOLATION.items())


def save_site(export, out: Path) -> None:
    """The page and the export as plain files in `out` (a new folder), for any static web server;
    the wasm is written uncompressed, and `_headers` lists the isolation headers (Netlify/Cloudflare
    Pages' format; docs/web.md shows nginx's and Apache's)."""
    out = Path(out)
    if os.path.lexists(out):
        raise DgportError(f"{out}: already exists; give a new folder (dgport web --save never overwrites)")
    tmp = out.with_name(f".{out.name}.dgport-tmp-{os.getpid()}")
    try:
        for url, (src, gzipped, root) in routes(export).items():
            if url == "/":
                continue
            dest = tmp / url.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with safe_files.open_binary(src, root, ExportError, "export again") as f, open(dest, "wb") as w:
                if gzipped:
                    with gzip.GzipFile(fileobj=f) as g:
                        shutil.copyfileobj(g, w, safe_files.CHUNK)
                else:
                    shutil.copyfileobj(f, w, safe_files.CHUNK)
        (tmp / "_headers").write_text(SITE_HEADERS)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
