"""The meterkit command: demo, policy check, simulate; exit codes and help."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import meterkit
from meterkit.cli.commands import _ProgressBar
from meterkit.cli.common import EXIT_INVALID, EXIT_OK, EXIT_USAGE
from meterkit.cli.parser import main
from meterkit.core.toml import locate
from tests.test_simulate import HOUR, one_key_burst, write_csv, write_jsonl

SEED = Path(meterkit.__file__).parent / "policies" / "crane_ledger.toml"
SEED_TEXT = SEED.read_text("utf-8")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- demo ------------------------------------------------------------------------------


def test_demo_shows_admissions_a_429_a_retry_a_402_and_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The demo exits 0 and prints every stage a client sees, within 100 lines."""
    code, out, err = run(capsys, "demo")
    assert code == EXIT_OK
    assert err == ""
    lines = out.splitlines()
    assert 60 <= len(lines) <= 100
    assert "  HTTP 429 Too Many Requests" in lines
    body = _json_after(lines, "  HTTP 429 Too Many Requests")
    assert body == {
        "error": {
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
            "message": "API rate limit exceeded. Try again later.",
            "retry_after": 53,
            "status": 429,
        }
    }
    assert "    Retry-After: 53" in lines
    assert any(line.startswith('    RateLimit: "key-hour";r=900;') for line in lines)
    assert (
        '    RateLimit-Policy: "key-hour";q=1000;w=3600, "org-hour";q=10000;w=3600, '
        '"key-burst";q=100;w=60' in lines
    )
    assert "  20 more calls at once: 20 denied, nothing charged (balance still 9999.00)" in lines
    retry = lines[
        lines.index(
            "3. wait retry_after = 52.15 s (Retry-After rounds up) on the virtual clock; retry"
        )
        + 2
    ]
    assert retry.split()[:3] == ["t+60.00s", "invoices.get", "200"]
    priced = {line.split()[1]: line.split()[3] for line in lines if line.startswith("  t+6")}
    assert priced["invoices.pdf"] == "0.25"
    assert priced["currency.convert"] == "0.08"
    assert priced["reports.generate"] == "0.15"
    billing = _json_after(lines, next(x for x in lines if x.startswith("  HTTP 402")))
    assert billing["error"]["code"] == "insufficient_credits"
    assert billing["error"]["status"] == 402
    assert "    allowance 10000.00   used 1.55   left 9998.45   requests 106" in lines


def _json_after(lines: list[str], marker: str) -> dict[str, object]:
    start = next(i for i in range(lines.index(marker), len(lines)) if lines[i] == "    {")
    end = next(i for i in range(start, len(lines)) if lines[i] == "    }")
    result: dict[str, object] = json.loads("\n".join(lines[start : end + 1]))
    return result


def test_python_dash_m_meterkit_runs_the_demo_in_a_real_process() -> None:
    """`python -m meterkit demo` in a subprocess exits 0 and prints the 429 and the 402."""
    proc = subprocess.run(
        [sys.executable, "-m", "meterkit", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "HTTP 429 Too Many Requests" in proc.stdout
    assert '"code": "insufficient_credits"' in proc.stdout
    assert proc.stderr == ""


# -- help and exit codes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["demo"],
        ["policy"],
        ["policy", "check"],
        ["simulate"],
        ["usage"],
        ["keys"],
        ["keys", "create"],
        ["keys", "list"],
        ["keys", "rotate"],
        ["keys", "revoke"],
    ],
)
def test_every_command_has_help_listing_the_exit_codes(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """`--help` on every command exits 0 and documents the exit codes."""
    code, out, _ = run(capsys, *argv, "--help")
    assert code == EXIT_OK
    assert out.startswith("usage: meterkit")
    assert "exit codes:" in out
    assert "3  the backend or key store cannot be reached" in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["policy"],
        ["keys"],
        ["frobnicate"],
        ["simulate"],
        ["policy", "check", "a", "b"],
        ["simulate", "t.csv", "--top", "0"],
        ["keys", "create", "--url", "memory://", "--org", "org_a", "--expires-in", "soon"],
    ],
)
def test_a_bad_command_line_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """A missing command, an unknown command or a bad option value exits 2 with usage."""
    code, out, err = run(capsys, *argv)
    assert code == EXIT_USAGE
    assert out == ""
    assert "usage: meterkit" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`--version` prints the package version and exits 0."""
    code, out, _ = run(capsys, "--version")
    assert (code, out.strip()) == (EXIT_OK, f"meterkit {meterkit.__version__}")


# -- policy check ----------------------------------------------------------------------------


def test_policy_check_prints_the_compiled_seed_policy(capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped policy is valid: its tiers, prices, categories and credits are listed."""
    code, out, err = run(capsys, "policy", "check", str(SEED))
    assert (code, err) == (EXIT_OK, "")
    lines = out.splitlines()
    assert lines[0] == f"{SEED}: valid policy 'crane-ledger'"
    assert "  key-burst  key      100     60s  sliding_log   every operation" in lines
    assert "  invoices.pdf      complex    0.25  invoices:read" in lines
    assert "  write    0.03-0.15  POST/PUT/DELETE operations" in lines
    assert "credits: 10000.00 per organization per calendar month (UTC), no rollover" in lines


def test_policy_check_lists_credit_alerts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A policy's credit alert thresholds are listed under its credits."""
    path = tmp_path / "policy.toml"
    path.write_text(
        SEED_TEXT.replace('period = "month"', 'period = "month"\nalerts = ["100%", "80%"]', 1),
        encoding="utf-8",
    )
    code, out, _ = run(capsys, "policy", "check", str(path))
    assert code == EXIT_OK
    assert "credit alerts at 80%, 100% of the month's credits" in out.splitlines()


def test_policy_check_json_is_the_policy_description(capsys: pytest.CaptureFixture[str]) -> None:
    """`--json` prints the compiled policy as one JSON object, marked valid."""
    code, out, _ = run(capsys, "policy", "check", str(SEED), "--json")
    assert code == EXIT_OK
    data = json.loads(out)
    assert data.pop("valid") is True
    assert data.pop("file") == str(SEED)
    assert data == json.loads(json.dumps(meterkit.Policy.crane_ledger().to_dict()))


BROKEN = [
    # (replace this, with this, the message after "FILE:LINE: ")
    ('rate = "100/minute"', 'rate = "often"', "invalid policy: tiers[2].rate: malformed rate"),
    (
        'price = "0.25"',
        'price = "0.5"',
        "invalid policy: operations.invoices.pdf.price: price 0.5 of 'invoices.pdf' is "
        "outside its category 'complex'",
    ),
    (
        'algorithm = "sliding_log"',
        'algorithm = "leaky"',
        "invalid policy: tiers[2].algorithm: Invalid enum value 'leaky'",
    ),
    (
        'category = "report"\nprice = "0.10"',
        'category = 7\nprice = "0.10"',
        "invalid policy: operations.reports.summary.category: Expected `str`, got `int`",
    ),
    (
        'description = "Convert an amount between currencies"',
        'colour = "red"',
        "invalid policy: operations.currency.convert: Object contains unknown field `colour`",
    ),
    ("[categories.write]", "[categories.write", "invalid policy: malformed TOML"),
    (
        'period = "month"',
        'alerts = ["80%", "120%"]\nperiod = "month"',
        "invalid policy: credits.alerts[1]: a threshold is a whole percent of the month's "
        "credits from 1% to 100%, such as '80%', not '120%'",
    ),
    (
        '"GET /organizations/{organization_id}/usage" = "usage.get"',
        '"GET /organizations/{organization_id}/usage" = "usage.put"',
        "invalid policy: routes.'GET /organizations/{organization_id}/usage': unknown "
        "operation 'usage.put'",
    ),
    # What the middleware would refuse, refused here (issue 12: one validation)
    (
        '"GET /organizations/{organization_id}/usage" = "usage.get"',
        '"GET /usage/{x}/{x}" = "usage.get"',
        "invalid policy: routes.'GET /usage/{x}/{x}': parameter {x} appears twice",
    ),
    (
        '"GET /organizations/{organization_id}/usage" = "usage.get"',
        '"GET /organizations/{organization_id}/invoices/{id}" = "usage.get"',
        "invalid policy: routes.'GET /organizations/{organization_id}/invoices/{id}': GET "
        "/organizations/{organization_id}/invoices/{id} is routed twice",
    ),
]


@pytest.mark.parametrize(("old", "new", "expected"), BROKEN)
def test_policy_check_names_the_line_and_field_of_a_mistake(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, old: str, new: str, expected: str
) -> None:
    """A broken policy file exits 1 and the error names the file, line and field."""
    assert old in SEED_TEXT
    path = tmp_path / "policy.toml"
    path.write_text(SEED_TEXT.replace(old, new, 1), encoding="utf-8")
    broken = path.read_text("utf-8").splitlines()
    line = next(n for n, text in enumerate(broken, 1) if new.split("\n")[0] in text)
    code, out, err = run(capsys, "policy", "check", str(path))
    assert code == EXIT_INVALID
    assert out == ""
    assert err.startswith(f"meterkit: error: {path}:{line}: {expected}")


def test_policy_check_json_reports_an_invalid_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With --json an invalid file still exits 1, and stdout says why as JSON."""
    path = tmp_path / "policy.toml"
    path.write_text(SEED_TEXT.replace('allowance = "10000"', 'allowance = "-1"'), "utf-8")
    code, out, err = run(capsys, "policy", "check", str(path), "--json")
    assert code == EXIT_INVALID
    data = json.loads(out)
    assert data["valid"] is False
    line = (
        SEED_TEXT.splitlines().index(
            'allowance = "10000"   # per organization per calendar '
            "month (UTC); the seed names no figure"
        )
        + 1
    )
    assert data["error"].startswith(f"{path}:{line}: invalid policy: credits.allowance:")
    assert "credits.allowance" in err


def test_policy_check_of_a_missing_file_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A policy path that does not exist is a usage error (2), not an invalid policy."""
    code, _, err = run(capsys, "policy", "check", str(tmp_path / "absent.toml"))
    assert code == EXIT_USAGE
    assert "No such file or directory" in err


def test_locate_finds_tables_array_tables_and_keys() -> None:
    """locate maps a policy error's location to the line of the field in the file."""
    text = (
        'name = "x"\n'  # 1
        "[credits]\n"  # 2
        "allowance = 1\n"  # 3
        "[[tiers]]\n"  # 4
        'rate = "1/second"\n'  # 5
        "[[tiers]]  # second\n"  # 6
        'name = "b"\n'  # 7
        'rate = "bad"\n'  # 8
        '[operations."a.b"]\n'  # 9
        "price = 1\n"  # 10
    )
    assert locate(text, "name") == 1
    assert locate(text, "credits.allowance") == 3
    assert locate(text, "tiers[1].rate") == 8
    assert locate(text, "tiers[1]") == 6
    assert locate(text, "operations.a.b.price") == 10
    assert locate(text, "operations.a.b.category") == 9  # absent key: the table's header
    assert locate(text, "shadow") is None
    assert locate(text, "") is None


# -- simulate ------------------------------------------------------------------------------


def test_simulate_json_counts_the_burst(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """150 requests of one key in a minute: JSON says 100 admitted, 50 denied by key-burst."""
    path = write_csv(tmp_path / "t.csv", one_key_burst())
    code, out, err = run(capsys, "simulate", str(path), "--json")
    assert (code, err) == (EXIT_OK, "")
    data = json.loads(out)
    assert (data["admitted"], data["denied"]) == (100, 50)
    assert data["denied_by_tier"] == {"key-hour": 0, "org-hour": 0, "key-burst": 50}
    assert data["denied_by_reason"] == {"rate_limited": 50, "insufficient_credits": 0}
    assert data["orgs"]["org_a"]["credits_charged"] == "1"
    assert data["most_limited_keys"] == [
        {"key": "key_a", "org": "org_a", "admitted": 100, "denied": 50}
    ]


def test_simulate_prints_a_readable_report(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The text report has the totals, the tier table, reasons, credits and limited keys."""
    path = write_jsonl(tmp_path / "t.jsonl", one_key_burst(), iso=True)
    code, out, _ = run(capsys, "simulate", str(path))
    assert code == EXIT_OK
    lines = out.splitlines()
    assert "  admitted 100 (66.7%), denied 50 (33.3%)" in lines
    assert "  key-burst       100      50" in lines
    assert "  rate_limited          50" in lines
    assert "  org_a       150       100      50     1.00  9999.00" in lines
    assert "  key_a  org_a       100      50" in lines


def test_simulate_with_a_policy_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--policy replays through that file's tiers: 10/minute admits 10 of the 150."""
    policy = tmp_path / "p.toml"
    policy.write_text(SEED_TEXT.replace('rate = "100/minute"', 'rate = "10/minute"'), "utf-8")
    path = write_csv(tmp_path / "t.csv", one_key_burst())
    code, out, _ = run(capsys, "simulate", str(path), "--policy", str(policy), "--json")
    assert code == EXIT_OK
    assert json.loads(out)["admitted"] == 10


def test_simulate_with_an_invalid_policy_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An invalid --policy file exits 1 naming its line, before any replay."""
    policy = tmp_path / "p.toml"
    policy.write_text(SEED_TEXT.replace('scope = "org"', 'scope = "team"'), "utf-8")
    path = write_csv(tmp_path / "t.csv", one_key_burst())
    code, out, err = run(capsys, "simulate", str(path), "--policy", str(policy))
    assert (code, out) == (EXIT_INVALID, "")
    line = policy.read_text("utf-8").splitlines().index('scope = "team"') + 1
    assert f"{policy}:{line}: invalid policy: tiers[1].scope" in err


def test_simulate_bad_row_exits_2_naming_the_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A bad row exits 2 and names the line; --skip-bad replays the rest and counts it."""
    path = tmp_path / "t.csv"
    path.write_text(
        "timestamp,key,org,operation\n"
        f"{HOUR},key_a,org_a,invoices.list\n"
        f"{HOUR},key_a,org_a,invoices.teleport\n",
        encoding="utf-8",
    )
    code, out, err = run(capsys, "simulate", str(path))
    assert (code, out) == (EXIT_USAGE, "")
    assert err == (
        f"meterkit: error: {path}: line 3: unknown operation 'invoices.teleport': "
        "it is not in the policy's cost table\n"
    )
    code, out, _ = run(capsys, "simulate", str(path), "--skip-bad", "--json")
    assert code == EXIT_OK
    assert (json.loads(out)["admitted"], json.loads(out)["skipped"]) == (1, 1)


def test_simulate_missing_trace_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A trace that does not exist exits 2."""
    code, _, err = run(capsys, "simulate", str(tmp_path / "absent.csv"))
    assert code == EXIT_USAGE
    assert "No such file or directory" in err


def test_simulate_reads_standard_input(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """TRACE '-' reads the trace from standard input."""
    text = write_csv(tmp_path / "t.csv", one_key_burst()).read_text("utf-8")
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code, out, _ = run(capsys, "simulate", "-", "--json")
    assert code == EXIT_OK
    assert json.loads(out)["denied"] == 50


def test_simulate_plot_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--plot writes a PNG of admitted and denied requests over time."""
    pytest.importorskip("matplotlib")
    path = write_csv(tmp_path / "t.csv", one_key_burst())
    png = tmp_path / "out.png"
    code, out, _ = run(capsys, "simulate", str(path), "--plot", str(png), "--json")
    assert code == EXIT_OK
    assert json.loads(out)["plot"] == str(png)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_simulate_plot_without_matplotlib_says_how_to_install_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without matplotlib, --plot exits 2 and names the 'plot' extra, before replaying."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = write_csv(tmp_path / "t.csv", one_key_burst())
    code, out, err = run(capsys, "simulate", str(path), "--plot", str(tmp_path / "o.png"))
    assert (code, out) == (EXIT_USAGE, "")
    assert "pip install 'meterkit[plot]'" in err


def test_no_progress_bar_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A long replay writes nothing to stderr when stderr is not a terminal."""
    rows = [(HOUR + i * 0.1, f"key_{i % 100}", "org_a", "invoices.list") for i in range(30_000)]
    path = write_csv(tmp_path / "t.csv", rows)
    code, _, err = run(capsys, "simulate", str(path))
    assert (code, err) == (EXIT_OK, "")


def test_the_progress_bar_draws_and_clears_one_line() -> None:
    """The bar draws after half a second, shows the fraction, and erases itself."""
    stream = io.StringIO()
    bar = _ProgressBar(1000, stream)
    bar(100)
    assert stream.getvalue() == ""  # too early to bother
    bar.started -= 1.0
    bar(250)
    assert stream.getvalue().startswith("\rreplaying [#######.......................]  25%")
    assert "250/1,000 lines" in stream.getvalue()
    bar.close()
    assert stream.getvalue().endswith("\r" + " " * 79 + "\r")


@pytest.mark.parametrize(
    ("rows", "out_name", "message"),
    [
        ([], "out.png", "nothing to plot: the trace has no requests"),
        (one_key_burst(), "out.xyz", "Format 'xyz' is not supported"),
        (one_key_burst(), "missing/out.png", "No such file or directory"),
    ],
)
def test_simulate_plot_that_cannot_be_drawn_exits_2(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    rows: list[tuple[float, str, str, str]],
    out_name: str,
    message: str,
) -> None:
    """An empty trace, an unknown image format or a missing folder: exit 2, and why."""
    pytest.importorskip("matplotlib")
    path = write_csv(tmp_path / "t.csv", rows)
    code, out, err = run(capsys, "simulate", str(path), "--plot", str(tmp_path / out_name))
    assert (code, out) == (EXIT_USAGE, "")
    assert message in err


PLANS_TEXT = """
[plans.pro]
allowance = "50000"
[plans.pro.tiers]
"key-hour" = "5000/hour"
"key-burst" = { rate = "300/minute" }
"""

BROKEN_PLANS = [
    # (old, new, the error after "file:line: ")
    (
        '"key-hour" = "5000/hour"',
        '"key-day" = "5/day"',
        "invalid policy: plans.pro.tiers.key-day: unknown tier 'key-day'",
    ),
    (
        '"key-hour" = "5000/hour"',
        '"key-hour" = "0/hour"',
        "invalid policy: plans.pro.tiers.key-hour: a rate of 0 admits nothing",
    ),
    (
        '"key-hour" = "5000/hour"',
        '"key-hour" = "5000/day"',
        "invalid policy: plans.pro.tiers.key-hour: a plan keeps each tier's window",
    ),
    (
        '{ rate = "300/minute" }',
        '{ rate = "often" }',
        "invalid policy: plans.pro.tiers.key-burst.rate: malformed rate 'often'",
    ),
    (
        '{ rate = "300/minute" }',
        '{ rate = "300/minute", algorithm = "gcra" }',
        "invalid policy: plans.pro.tiers.key-burst.algorithm: a plan keeps each tier's algorithm",
    ),
    (
        'allowance = "50000"',
        'allowance = "10000000000"',
        "invalid policy: plans.pro.allowance: plans.pro.allowance is too large",
    ),
    (
        'allowance = "50000"',
        "burst = 3",
        "invalid policy: plans.pro: Object contains unknown field `burst`",
    ),
]


@pytest.mark.parametrize(("old", "new", "expected"), BROKEN_PLANS)
def test_policy_check_names_the_line_of_a_plans_mistake(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, old: str, new: str, expected: str
) -> None:
    """A plan's unknown tier, zero or malformed rate, other window or algorithm, huge
    allowance or unknown field exits 1 naming the file, line and field."""
    path = tmp_path / "policy.toml"
    text = SEED_TEXT + PLANS_TEXT
    assert old in PLANS_TEXT
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    line = next(n for n, t in enumerate(path.read_text("utf-8").splitlines(), 1) if new in t)
    code, out, err = run(capsys, "policy", "check", str(path))
    assert out == ""
    assert code == EXIT_INVALID
    assert err.startswith(f"meterkit: error: {path}:{line}: {expected}"), err


def test_policy_check_lists_the_plans(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A valid policy's plans are printed with their allowance and changes."""
    path = tmp_path / "policy.toml"
    path.write_text(SEED_TEXT + PLANS_TEXT, encoding="utf-8")
    code, out, _ = run(capsys, "policy", "check", str(path))
    assert code == EXIT_OK
    assert "  pro    50000.00  key-hour 5000/hour, key-burst 300/minute" in out.splitlines()
    data = json.loads(run(capsys, "policy", "check", str(path), "--json")[1])
    assert data["plans"]["pro"]["tiers"]["key-hour"] == {
        "limit": 5000,
        "window_seconds": 3600,
        "burst": None,
    }
