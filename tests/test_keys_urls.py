"""Key store URLs: the same spellings as backend_from_url."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

import meterkit
from tests import _servers


def test_keystore_from_url_accepts_redis_unix_sockets() -> None:
    """``redis+unix://PATH`` reaches a real server over its Unix socket."""
    if _servers.redis_binary() is None:
        if _servers.require_redis():
            pytest.fail("no redis-server binary and METERKIT_REQUIRE_REDIS=1")
        pytest.skip("no redis-server binary on PATH")
    with tempfile.TemporaryDirectory(prefix="mk-sock-") as tmp:
        sock = Path(tmp) / "redis.sock"
        with _servers.standalone("--unixsocket", str(sock), "--unixsocketperm", "700"):
            store = meterkit.keystore_from_url(f"redis+unix://{sock}")
            plaintext, key = store.create(org="org_sock", permissions=["invoices:read"])
            found = store.authenticate(f"Bearer {plaintext}", org="org_sock")
            assert found.id == key.id


def test_keystore_from_url_refuses_cluster_urls_with_a_typed_error() -> None:
    """Redis Cluster is not supported for keys, and the error says so."""
    with pytest.raises(meterkit.ConfigurationError, match="Cluster"):
        meterkit.keystore_from_url("redis+cluster://127.0.0.1:7000")
