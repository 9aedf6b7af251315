"""An items API of our own for the Idempotency-Key tests, in FastAPI and in Flask.

Each handler counts its runs (:class:`Runs`), so that a test can tell a replay from a
second run:

- ``POST /v1/items`` (``items.create``): makes ``it_<n>`` from a JSON body, 201, with a
  cookie and an ``X-Run`` header; its first run can be held until the test lets it go;
- ``POST /v1/items/fail`` (``items.create``): 500 while ``runs.failing``, else 201;
- ``POST /v1/items/export`` (``items.export``): streams ``size`` bytes (from the body)
  in pieces of 4 KiB;
- ``GET /v1/items`` (``items.list``): how many items were made;
- ``GET /health``: not metered.

Run as a module (``python -m tests.http._idem``) it serves one of them on Redis, for a
test that kills the process mid-request: see :func:`main`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import flask
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

import meterkit
from meterkit import Decision
from meterkit.fastapi import Metered as FastAPIMetered
from meterkit.flask import Metered as FlaskMetered

PIECE = 4096


class Runs:
    """How often each handler ran, and the hold on the first run of ``POST /v1/items``."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        #: When set, the first run of POST /v1/items waits for it (``wait`` seconds at most).
        self.hold: threading.Event | None = None
        self.wait = 10.0
        #: Set when that run has started (and is waiting).
        self.entered = threading.Event()
        #: POST /v1/items/fail answers 500 while this is true.
        self.failing = True

    def run(self, name: str) -> int:
        with self.lock:
            self.counts[name] += 1
            return self.counts[name]

    def held(self, n: int) -> threading.Event | None:
        """The hold this run waits for (only the first run, and only when set)."""
        if n != 1 or self.hold is None:
            return None
        self.entered.set()
        print("entered", flush=True)  # (for a server in another process)
        return self.hold


class ItemIn(BaseModel):
    name: str


def _pieces(size: int) -> Iterator[bytes]:
    for start in range(0, size, PIECE):
        yield b"x" * min(PIECE, size - start)


def fastapi_app(meter: Any, keystore: Any, runs: Runs, **options: Any) -> FastAPI:
    """The API in FastAPI, each route naming its operation."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await meter.aclose()  # (a Redis backend made from a URL owns its client)

    app = FastAPI(lifespan=lifespan)
    metered = FastAPIMetered(app, meter=meter, keystore=keystore, **options)
    create, listing, export = (metered(op) for op in ("items.create", "items.list", "items.export"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/items", status_code=201)
    async def create_item(item: ItemIn, _: Decision = Depends(create)) -> Any:
        n = runs.run("create")
        hold = runs.held(n)
        if hold is not None:
            await asyncio.to_thread(hold.wait, runs.wait)
        answer = JSONResponse({"id": f"it_{n}", "name": item.name}, 201)
        answer.set_cookie("session", f"s{n}")
        answer.headers["X-Run"] = str(n)
        return answer

    @app.post("/v1/items/fail", status_code=201)
    async def fail(item: ItemIn, _: Decision = Depends(create)) -> Any:
        n = runs.run("fail")
        if runs.failing:
            return JSONResponse({"error": "down"}, 500)
        return {"id": f"it_f{n}", "name": item.name}

    @app.post("/v1/items/export")
    async def export_items(request: Request, _: Decision = Depends(export)) -> Any:
        size = int((await request.json())["size"])
        n = runs.run("export")
        return StreamingResponse(
            _pieces(size), media_type="application/octet-stream", headers={"X-Run": str(n)}
        )

    @app.get("/v1/items")
    async def list_items(_: Decision = Depends(listing)) -> Any:
        return {"made": runs.counts["create"]}

    return app


def flask_app(meter: Any, keystore: Any, runs: Runs, **options: Any) -> flask.Flask:
    """The API in Flask, each view naming its operation."""
    app = flask.Flask(__name__)
    metered = FlaskMetered(app, meter=meter, keystore=keystore, **options)

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok"}

    @app.post("/v1/items")
    @metered("items.create")
    def create_item() -> Any:
        n = runs.run("create")
        hold = runs.held(n)
        if hold is not None:
            hold.wait(runs.wait)
        answer = flask.jsonify({"id": f"it_{n}", "name": flask.request.get_json()["name"]})
        answer.status_code = 201
        answer.set_cookie("session", f"s{n}")
        answer.headers["X-Run"] = str(n)
        return answer

    @app.post("/v1/items/fail")
    @metered("items.create")
    def fail() -> Any:
        n = runs.run("fail")
        if runs.failing:
            return {"error": "down"}, 500
        return {"id": f"it_f{n}", "name": flask.request.get_json()["name"]}, 201

    @app.post("/v1/items/export")
    @metered("items.export")
    def export_items() -> Any:
        size = int(flask.request.get_json()["size"])
        n = runs.run("export")
        return flask.Response(
            _pieces(size), mimetype="application/octet-stream", headers={"X-Run": str(n)}
        )

    @app.get("/v1/items")
    @metered("items.list")
    def list_items() -> Any:
        return {"made": runs.counts["create"]}

    return app


def main() -> None:
    """Serve the API on Redis until killed: ``FRAMEWORK`` (fastapi or flask), ``PORT``,
    ``REDIS_URL``, ``PREFIX`` (the backend's keys), ``NAMESPACE`` (the key store's) and
    ``CLOCK_FILE`` (the clock: UNIX seconds, read from the file at every check). The
    first ``POST /v1/items`` holds until the process dies, after printing ``entered``."""
    from tests.http._items import ORG_PATTERN, POLICY_TOML, PREFIX

    env = os.environ
    clock_file = Path(env["CLOCK_FILE"])

    def clock() -> float:
        return float(clock_file.read_text())

    policy = meterkit.Policy.from_toml(POLICY_TOML)
    url, port = env["REDIS_URL"], int(env["PORT"])
    store = {"namespace": env["NAMESPACE"], "token_prefix": PREFIX, "org_pattern": ORG_PATTERN}
    runs = Runs()
    runs.hold = threading.Event()
    runs.wait = 3600
    if env["FRAMEWORK"] == "fastapi":
        import uvicorn

        backend = meterkit.async_backend_from_url(url, prefix=env["PREFIX"], clock=clock)
        keystore = meterkit.async_keystore_from_url(url, **store)  # type: ignore[arg-type]
        app: Any = fastapi_app(
            meterkit.AsyncMeter(policy, backend), keystore, runs, require_https=False
        )
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    else:
        import waitress  # type: ignore[import-untyped]

        sync_backend = meterkit.backend_from_url(url, prefix=env["PREFIX"], clock=clock)
        sync_store = meterkit.keystore_from_url(url, **store)  # type: ignore[arg-type]
        app = flask_app(meterkit.Meter(policy, sync_backend), sync_store, runs, require_https=False)
        waitress.serve(app, host="127.0.0.1", port=port, threads=4, _quiet=True)


if __name__ == "__main__":
    sys.exit(main())
