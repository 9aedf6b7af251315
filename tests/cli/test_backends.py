"""`meterkit keys` and `meterkit usage` against real stores: memory:// and a real Redis."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import meterkit
from meterkit.cli.common import EXIT_BACKEND, EXIT_INVALID, EXIT_OK, EXIT_USAGE, POLICY_ENV
from meterkit.cli.parser import main
from meterkit.connect import backend_from_url, keystore_from_url
from tests import _servers

PEPPER = "a pepper of at least 16 bytes"
PLAINTEXT = re.compile(r"^cl_(live|test)_[0-9A-Za-z]{50}$")


SEED_POLICY = str(Path(meterkit.__file__).parent / "policies" / "crane_ledger.toml")


@pytest.fixture(autouse=True)
def seed_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands on backends name their policy: here the seed's, through the
    environment variable the CLI documents."""
    monkeypatch.setenv(POLICY_ENV, SEED_POLICY)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == EXIT_OK, err
    return json.loads(out)


def test_keys_create_prints_the_plaintext_once(capsys: pytest.CaptureFixture[str]) -> None:
    """`keys create` prints the new key's facts and its plaintext on a line of its own."""
    code, out, err = run(
        capsys,
        "keys",
        "create",
        "--url",
        "memory://",
        "--org",
        "org_acme",
        "--permission",
        "invoices:read,reports:read",
        "--permission",
        "usage:read",
        "--name",
        "billing job",
        "--mode",
        "test",
        "--expires-at",
        "2030-01-01",
    )
    assert code == EXIT_OK
    lines = out.splitlines()
    assert re.fullmatch(r"created key_[0-9A-Za-z]{12} for org_acme", lines[0])
    assert "  permissions  invoices:read, reports:read, usage:read" in lines
    assert "  expires      2030-01-01T00:00:00Z" in lines
    assert "  name         billing job" in lines
    secrets = [line for line in lines if PLAINTEXT.match(line)]
    assert len(secrets) == 1
    assert secrets[0].startswith("cl_test_")
    assert "shown only once" in err


def test_keys_on_an_unreachable_redis_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    """A key store that cannot be reached exits 3 (backend unavailable)."""
    url = f"redis://127.0.0.1:{_servers.free_port()}/0"
    code, out, err = run(capsys, "keys", "list", "--url", url, "--org", "org_acme")
    assert (code, out) == (EXIT_BACKEND, "")
    assert err.startswith("meterkit: error: backend:")


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "revoke", "--url", "memory://", "key_AAAAAAAAAAAA"],
        ["keys", "revoke", "--url", "memory://", "not-a-key-id"],
        ["keys", "create", "--url", "memory://", "--org", "acme"],
        ["keys", "create", "--url", "memory://", "--org", "org_a", "--permission", "write all"],
        ["keys", "list", "--url", "ftp://example", "--org", "org_acme"],
    ],
)
def test_invalid_key_requests_exit_1(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """An unknown key id, a malformed id, org or permission, or a bad URL exits 1."""
    code, out, err = run(capsys, *argv)
    assert (code, out) == (EXIT_INVALID, "")
    assert "meterkit: error:" in err


def test_the_key_lifecycle_on_redis(capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
    """Create, list, rotate and revoke on Redis: each printed plaintext authenticates."""
    base = ("--url", redis_url, "--namespace", "mk-cli")
    store = keystore_from_url(redis_url, namespace="mk-cli")
    org = "org_cli_lifecycle"
    created = run_json(
        capsys,
        "keys",
        "create",
        *base,
        "--org",
        org,
        "--permission",
        "invoices:read",
        "--expires-in",
        "7d",
    )
    first_id = created["key"]["id"]
    assert PLAINTEXT.match(created["plaintext"])
    assert store.authenticate(f"Bearer {created['plaintext']}", org=org).id == first_id

    listed = run_json(capsys, "keys", "list", *base, "--org", org)
    assert [(k["id"], k["status"], k["permissions"]) for k in listed] == [
        (first_id, "active", ["invoices:read"])
    ]

    rotated = run_json(capsys, "keys", "rotate", *base, first_id, "--grace", "1h")
    second_id = rotated["key"]["id"]
    assert second_id != first_id
    assert rotated["replaced"]["id"] == first_id
    assert rotated["replaced"]["expires_at"] is not None
    assert store.authenticate(f"Bearer {rotated['plaintext']}", org=org).id == second_id
    assert store.authenticate(f"Bearer {created['plaintext']}", org=org).id == first_id

    revoked = run_json(capsys, "keys", "revoke", *base, first_id)
    assert (revoked["id"], revoked["status"]) == (first_id, "revoked")
    with pytest.raises(meterkit.AuthenticationError):
        store.authenticate(f"Bearer {created['plaintext']}", org=org)

    code, out, _ = run(capsys, "keys", "list", *base, "--org", org)
    assert code == EXIT_OK
    rows = out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [first_id, second_id]
    assert [row.split()[3] for row in rows] == ["revoked", "active"]
    store.close()


def test_keys_use_the_pepper_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """A key created under METERKIT_PEPPER authenticates only with that pepper."""
    monkeypatch.setenv("METERKIT_PEPPER", PEPPER)
    created = run_json(
        capsys,
        "keys",
        "create",
        "--url",
        redis_url,
        "--namespace",
        "mk-cli",
        "--org",
        "org_cli_pepper",
    )
    token = f"Bearer {created['plaintext']}"
    peppered = keystore_from_url(redis_url, namespace="mk-cli", pepper=PEPPER)
    plain = keystore_from_url(redis_url, namespace="mk-cli")
    assert peppered.authenticate(token, org="org_cli_pepper").id == created["key"]["id"]
    with pytest.raises(meterkit.AuthenticationError):
        plain.authenticate(token, org="org_cli_pepper")
    peppered.close()
    plain.close()


# -- usage ------------------------------------------------------------------------------------


@pytest.fixture(params=["redis_url", "redis_cluster_url"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """A real Redis, standalone then Cluster."""
    url: str = request.getfixturevalue(request.param)
    return url


def test_usage_reads_an_organizations_month_from_redis(
    capsys: pytest.CaptureFixture[str], backend_url: str
) -> None:
    """`usage` reports what checks on a Redis backend charged, per operation and per key."""
    redis_url = backend_url
    backend = backend_from_url(redis_url, prefix="mk-cli-usage")
    meter = meterkit.Meter(meterkit.Policy.crane_ledger(), backend)
    org = "org_cli_usage"
    meter.set_allowance(org, "50")
    for _ in range(3):
        assert meter.check("key_a", org=org, operation="invoices.list").allowed
    assert meter.check("key_b", org=org, operation="invoices.pdf").allowed
    meter.close()
    base = ("usage", "--url", redis_url, "--prefix", "mk-cli-usage", "--org", org)

    data = run_json(capsys, *base)
    assert (data["org"], data["requests"], data["allowance"]) == (org, 4, "50")
    assert (data["credits_used"], data["credits_left"]) == ("0.28", "49.72")
    assert data["operations"] == {
        "invoices.list": {"requests": 3, "credits": "0.03"},
        "invoices.pdf": {"requests": 1, "credits": "0.25"},
    }
    assert data["keys"] == {
        "key_a": {"requests": 3, "credits": "0.03"},
        "key_b": {"requests": 1, "credits": "0.25"},
    }

    one_key = run_json(capsys, *base, "--key", "key_b")
    assert (one_key["requests"], one_key["credits_used"], one_key["credits_left"]) == (
        1,
        "0.25",
        "49.72",
    )

    code, out, _ = run(capsys, *base)
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].startswith(f"usage of {org}, ")
    assert "  allowance 50.00   used 0.28   left 49.72   requests 4" in lines
    assert "    invoices.pdf          1     0.25" in lines
    assert "    key_a         3     0.03" in lines


def test_usage_of_an_empty_memory_backend(capsys: pytest.CaptureFixture[str]) -> None:
    """On memory:// (empty by nature) usage is the policy's allowance, untouched."""
    code, out, err = run(capsys, "usage", "--url", "memory://", "--org", "org_new", "--json")
    assert code == EXIT_OK
    data = json.loads(out)
    assert (data["requests"], data["credits_used"], data["credits_left"]) == (0, "0", "10000")
    assert "memory://" in err


def test_usage_on_an_unreachable_redis_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    """A backend that cannot be reached exits 3."""
    url = f"redis://127.0.0.1:{_servers.free_port()}/0"
    code, out, err = run(capsys, "usage", "--url", url, "--org", "org_acme")
    assert (code, out) == (EXIT_BACKEND, "")
    assert err.startswith("meterkit: error: backend:")


@pytest.mark.parametrize(
    "argv",
    [
        ["usage", "--url", "ftp://example", "--org", "org_acme"],
        ["usage", "--url", "memory://", "--org", ""],
        ["usage", "--url", "memory://", "--org", "org_a", "--key", "a\tb"],
    ],
)
def test_invalid_usage_requests_exit_1(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """An unsupported URL or an invalid organization or key id exits 1."""
    code, out, err = run(capsys, *argv)
    assert (code, out) == (EXIT_INVALID, "")
    assert "meterkit: error:" in err


def test_reset_limits_frees_a_key_on_redis(
    capsys: pytest.CaptureFixture[str], backend_url: str
) -> None:
    """`reset-limits --key` lets a key that spent the seed's burst (100 a minute)
    through again at once; its usage stays. Without --key, the organization's."""
    backend = backend_from_url(backend_url, prefix="mk-cli-reset")
    meter = meterkit.Meter(meterkit.Policy.crane_ledger(), backend)
    org = "org_cli_reset"
    for _ in range(100):
        assert meter.check("key_a", org=org, operation="invoices.list").allowed
    assert meter.check("key_a", org=org, operation="invoices.list").reason == "rate_limited"
    base = ("reset-limits", "--url", backend_url, "--prefix", "mk-cli-reset", "--org", org)
    code, out, _ = run(capsys, *base, "--key", "key_a")
    assert code == EXIT_OK
    assert out == f"rate limits of key_a of {org} (live) reset: its key-scoped tiers start afresh\n"
    assert meter.check("key_a", org=org, operation="invoices.list").allowed
    assert meter.usage(org).requests == 101
    assert run_json(capsys, *base) == {"org": org, "key": None, "mode": "live", "reset": True}
    meter.close()


@pytest.mark.parametrize("command", ["usage", "reset-limits"])
def test_commands_on_a_backend_require_the_policy(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """Without --policy or METERKIT_POLICY, usage and reset-limits refuse to guess: the
    example policy would read another allowance and clear keys the app does not use."""
    monkeypatch.delenv(POLICY_ENV)
    code, out, err = run(capsys, command, "--url", "memory://", "--org", "org_1", "--key", "k")
    assert code == EXIT_USAGE
    assert "--policy" in err
    assert POLICY_ENV in err
    assert out == ""


def test_policy_given_on_the_command_line_wins_over_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--policy is read before $METERKIT_POLICY: the allowance shown is that file's."""
    own = tmp_path / "own.toml"
    own.write_text(
        Path(SEED_POLICY).read_text("utf-8").replace('allowance = "10000"', 'allowance = "77"')
    )
    monkeypatch.setenv(POLICY_ENV, str(tmp_path / "missing.toml"))
    data = run_json(capsys, "usage", "--url", "memory://", "--org", "org_1", "--policy", str(own))
    assert data["allowance"] == "77"
    code, _, err = run(capsys, "usage", "--url", "memory://", "--org", "org_1")
    assert code == EXIT_USAGE
    assert "missing.toml" in err


# -- plans ----------------------------------------------------------------------------------


def test_plans_set_show_and_clear_on_redis(
    capsys: pytest.CaptureFixture[str], backend_url: str, tmp_path: Path
) -> None:
    """`plans set|show|clear` keep an organization's plan, a key's plan and negotiated
    limits in the backend, where checks find them; bad input exits 1 or 2."""
    policy = tmp_path / "plans.toml"
    policy.write_text(
        Path(SEED_POLICY).read_text("utf-8")
        + '\n[plans.pro]\nallowance = "50000"\n[plans.pro.tiers]\n"key-hour" = "5000/hour"\n',
        encoding="utf-8",
    )
    org = "org_cli_plans"
    base = ("--url", backend_url, "--prefix", "mk-cli-plans", "--org", org, "--policy", str(policy))
    data = run_json(capsys, "plans", "set", "pro", *base)
    assert (data["plan"], data["org_plan"], data["allowance"]) == ("pro", "pro", "50000")
    data = run_json(capsys, "plans", "set", *base, "--limit", "org-hour=20000/hour")
    assert data["limits"] == {"org-hour": "20000/hour"}
    assert {t["name"]: t["limit"] for t in data["tiers"]} == {
        "key-hour": 5000,
        "org-hour": 20000,
        "key-burst": 100,
    }
    data = run_json(capsys, "plans", "set", "default", *base, "--key", "key_x")
    assert (data["plan"], data["key_plan"]) == ("default", "default")
    meter = meterkit.Meter(
        meterkit.Policy.from_toml(policy), backend_from_url(backend_url, prefix="mk-cli-plans")
    )
    assert meter.check("key_a", org=org, operation="invoices.list").plan == "pro"
    assert meter.check("key_x", org=org, operation="invoices.list").plan == "default"
    code, out, _ = run(capsys, "plans", "show", *base, "--key", "key_x")
    assert code == EXIT_OK
    assert out.splitlines()[0] == f"key_x of {org} (live) is on plan 'default'"
    assert "  negotiated limits    org-hour=20000/hour" in out.splitlines()
    run_json(capsys, "plans", "clear", *base, "--key", "key_x")
    data = run_json(capsys, "plans", "clear", *base)
    assert (data["plan"], data["limits"]) == ("default", {})
    assert meter.check("key_a", org=org, operation="invoices.list").plan == "default"
    meter.close()
    assert run(capsys, "plans", "set", "gold", *base)[0] == EXIT_INVALID
    assert run(capsys, "plans", "set", *base, "--limit", "nope=1/hour")[0] == EXIT_INVALID
    assert run(capsys, "plans", "set", *base, "--limit", "org-hour")[0] == EXIT_USAGE
    assert run(capsys, "plans", "set", *base)[0] == EXIT_USAGE
