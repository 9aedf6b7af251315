"""The items API (see tests/http/_items.py) as a Django URLconf; views name their
operations with meterkit.django.metered."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from django.http import Http404, HttpRequest, JsonResponse, StreamingHttpResponse
from django.urls import path

from meterkit.django import metered
from tests.http._items import export_cost


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@metered("items.list", org="path:project_id")
def project_items(request: HttpRequest, project_id: str) -> JsonResponse:
    decision = request.meterkit.decision  # type: ignore[attr-defined]
    return JsonResponse(
        {"project": project_id, "org": decision.org, "charged": str(decision.charged)}
    )


@metered("items.list")
def items(request: HttpRequest) -> JsonResponse:
    admission: Any = request.meterkit  # type: ignore[attr-defined]
    return JsonResponse({"org": admission.decision.org, "key": admission.key.id})


@metered("items.get")
def item(request: HttpRequest, item_id: str) -> JsonResponse:
    raise Http404(f"no item {item_id}")


@metered("items.export", cost=export_cost)
def export(request: HttpRequest) -> JsonResponse:
    decision = request.meterkit.decision  # type: ignore[attr-defined]
    return JsonResponse({"bytes": len(request.body), "charged": str(decision.charged)})


@metered("auth.login", caller="ip")
def login(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"caller": request.meterkit.decision.key})  # type: ignore[attr-defined]


#: How often the views that make something ran.
RUNS: Counter[str] = Counter()


@metered("items.create")
def create(request: HttpRequest) -> JsonResponse:
    RUNS["create"] += 1
    n = RUNS["create"]
    made = JsonResponse({"id": f"it_{n}", "name": json.loads(request.body)["name"]}, status=201)
    made.set_cookie("session", f"s{n}")
    return made


@metered("items.export")
def stream(request: HttpRequest) -> StreamingHttpResponse:
    RUNS["stream"] += 1
    pieces = (b"%d:" % RUNS["stream"] + b"x" * 1000 for _ in range(5))
    return StreamingHttpResponse(pieces, content_type="application/octet-stream")


def broken(request: HttpRequest) -> JsonResponse:
    raise RuntimeError("the report generator crashed")


urlpatterns = [
    path("health", health),
    path("v1/projects/<str:project_id>/items", project_items),
    path("v1/items", items),
    path("v1/items/new", create),
    path("v1/items/stream", stream),
    path("v1/items/export", export),
    path("v1/items/<str:item_id>", item),
    path("v1/login", login),
    path("v1/report", metered("items.create")(broken)),
]
