"""Who may drive the server: the Host header (DNS rebinding), the API key, JSON-only POST bodies.

DNS rebinding: a web page from evil.example can point that name at 127.0.0.1 and then read a loopback
server's answers as its own origin's; the browser still sends `Host: evil.example`. So the Host
header must name this server: `localhost`, an IP address (v4, or v6 in brackets: a page cannot rebind
an address, the browser connects to it), the `--host` name, or a name given with `--allow-host`; any
port. `--allow-host '*'` turns the check off. Bound to 0.0.0.0 or ::, the machine's own names are
unknown: clients that call it by name need `--allow-host NAME`.

Cross-site requests: a page may POST a `text/plain` or form body to any address without asking
first (no CORS preflight); only `application/json` needs the preflight, which this server never
grants. So the POST routes take `Content-Type: application/json` (optionally `; charset=utf-8`)."""

import hmac
import ipaddress
import re

from .protocol import ApiError

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_dns_name(name: str) -> bool:
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def host_name(value: str) -> str | None:
    """The name a Host header carries, lowercased, without its port and one trailing dot; IPv6
    without brackets; None when it is not `name[:port]`, `a.b.c.d[:port]` or `[v6][:port]`."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        name, rest = v[1:end], v[end + 1:]
        if end < 0 or ":" not in name or not _is_ip(name):
            return None
    else:
        name, sep, port = v.partition(":")
        rest = sep + port
        if name.endswith("."):
            name = name[:-1]
        if not (_is_ip(name) or _is_dns_name(name)):
            return None
    if rest and not (rest[0] == ":" and _PORT.fullmatch(rest[1:])):
        return None
    return name


def check_allow_host(value: str) -> str:
    """An --allow-host value (a host name, an IP address or '*'), as the Host check compares it."""
    if value == "*":
        return value
    name = value.lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name.endswith("."):
        name = name[:-1]
    if not (_is_ip(name) or _is_dns_name(name)):
        raise ValueError(f"{value!r} is not a host name (letters, digits, '-' and '.', e.g. myhost.lan), "
                         "an IP address, or '*' (any Host); give it without scheme or port")
    return name


def allow_host_option(ctx, param, values):
    """The click callback of --allow-host (dgport serve, dgport web): each value checked at once."""
    import click

    try:
        for v in values:
            check_allow_host(v)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    return values


def allowed_hosts(bind_host: str, allow) -> frozenset | None:
    """The names the Host check accepts besides localhost and IP addresses (None: any Host)."""
    if "*" in allow:
        return None
    names = {check_allow_host(a) for a in allow}
    bound = host_name(bind_host)
    if bound is not None and not _is_ip(bound):
        names.add(bound)
    return frozenset(names)


def host_allowed(value: str, allowed: frozenset | None) -> bool:
    if allowed is None:
        return True
    name = host_name(value)
    return name is not None and (name == "localhost" or _is_ip(name) or name in allowed)


def check_json_content_type(value: str | None) -> None:
    """415 unless the body is declared `application/json` (with at most `charset=utf-8`)."""
    media, *params = (value or "").split(";")
    ok = media.strip().lower() == "application/json"
    for param in params:
        key, _, val = param.partition("=")
        ok = ok and key.strip().lower() == "charset" and val.strip().strip('"').lower() == "utf-8"
    if not ok:
        shown = repr(value[:100]) if value else "none"
        raise ApiError(415, f"Content-Type must be application/json (got {shown}); send the body as JSON with "
                       "that header", code="unsupported_media_type")


async def _refuse(e: ApiError, scope, receive, send) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(e.body(), status_code=e.status)(scope, receive, send)


class HostGuard:
    """Plain ASGI middleware: a request whose Host header names another server gets a 421."""

    def __init__(self, app, allowed: frozenset | None):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed is not None:
            hosts = [v.decode("latin-1") for k, v in scope["headers"] if k == b"host"]
            # HTTP/1.0 may omit Host (a browser never does); two Host headers are refused
            if len(hosts) > 1 or (hosts and not host_allowed(hosts[0], self.allowed)):
                shown = repr(hosts[0][:100]) if len(hosts) == 1 else f"{len(hosts)} Host headers"
                await _refuse(ApiError(421, f"the Host header {shown} does not name this server (DNS rebinding "
                                       "protection); if it is this machine's name, start the server with "
                                       "--allow-host NAME", code="host_not_allowed"), scope, receive, send)
                return
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    """Plain ASGI (no BaseHTTPMiddleware, which would buffer streams and hide disconnects): /v1 needs
    `Authorization: Bearer KEY`, compared in constant time; /health stays open for probes."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                await _refuse(ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                       type_="authentication_error", code="invalid_api_key"), scope, receive, send)
                return
        await self.app(scope, receive, send)
