"""One log line per request: method, route, status, generated tokens and milliseconds; never the
prompt or the answer. A pure ASGI middleware, so a streamed answer is logged when its last chunk
has gone, with the tokens it held (handlers write them into `scope[TOKENS]`)."""
import logging
import time

log = logging.getLogger("dgport.serve")
TOKENS = "dgport.tokens"  # scope key: a one-item list the handlers fill with the completion's token count


class AccessLog:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[TOKENS] = [None]
        started, status = time.perf_counter(), [None]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                line()

        logged = [False]

        def line():
            if logged[0]:
                return
            logged[0] = True
            tokens = scope[TOKENS][0]
            log.info("%s %s %s%s %.0f ms", scope["method"], scope["path"], status[0] or "-",
                     "" if tokens is None else f" {tokens} tokens", 1000 * (time.perf_counter() - started))

        try:
            await self.app(scope, receive, sending)
        finally:
            line()  # a client that left before the end still gets its line
