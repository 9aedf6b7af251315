"""Fixtures of the backend tests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import shared_client


@pytest.fixture(params=["redis", "redis-cluster"])
def client(request: pytest.FixtureRequest) -> Any:
    """A shared synchronous client of the session's standalone server, then cluster."""
    fixture = "redis_url" if request.param == "redis" else "redis_cluster_url"
    return shared_client(request, request.getfixturevalue(fixture))
