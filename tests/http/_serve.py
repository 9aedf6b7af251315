"""Real servers on loopback for the HTTP tests: uvicorn (ASGI) and waitress (WSGI).

Each runs in a thread of the test process, on a free port, and is stopped when its
``with`` block ends.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
import waitress  # type: ignore[import-untyped]

from tests._servers import free_port


class StartupFailed(RuntimeError):
    """The server refused to start (uvicorn: the app's lifespan startup failed)."""


@contextmanager
def serve_asgi(app: Any, *, proxy_headers: bool = True) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port; yield its base URL.

    uvicorn believes X-Forwarded-Proto (and -For) from 127.0.0.1, as behind a local
    TLS-terminating proxy.
    """
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        proxy_headers=proxy_headers,
        forwarded_allow_ips="127.0.0.1",
        ws="none",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    exits: list[object] = []

    def run() -> None:
        try:
            server.run()
        except SystemExit as exc:  # uvicorn's answer to a failed startup
            exits.append(exc.code)

    # uvicorn binds the port itself: on sockets handed to it, it answers ~40 ms slower.
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive():
            raise StartupFailed(f"uvicorn did not start (exit {exits[0] if exits else None})")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("uvicorn did not start in 10 s")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def serve_wsgi(app: Any, **adjustments: Any) -> Iterator[str]:
    """Run the WSGI ``app`` under waitress on a free loopback port; yield its base URL.

    By default waitress believes X-Forwarded-Proto from 127.0.0.1 and sets
    ``wsgi.url_scheme`` from it, as behind a local TLS-terminating proxy.
    """
    options = {"trusted_proxy": "127.0.0.1", "trusted_proxy_headers": "x-forwarded-proto"}
    options.update(adjustments)
    options = {name: value for name, value in options.items() if value is not None}
    server: Any = waitress.create_server(app, host="127.0.0.1", port=0, threads=4, **options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        # Closing from the server's own loop ends it at once (not at its next 1 s poll).
        try:
            server.trigger.pull_trigger(server.close)
        except OSError:
            # The trigger's pipe is gone already ("Bad file descriptor", seen a few times
            # under load): close from here instead; the loop ends at its next poll.
            with contextlib.suppress(OSError):
                server.close()
        thread.join(10)
