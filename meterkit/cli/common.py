"""What the ``meterkit`` commands share: exit codes, output, policy loading and the
location of a policy error in its TOML file."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from meterkit.errors import (
    ConfigurationError,
)

if TYPE_CHECKING:
    from meterkit.core.policy import Policy

__all__ = ["EXIT_BACKEND", "EXIT_INVALID", "EXIT_OK", "EXIT_USAGE", "locate"]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_BACKEND = 3

_EXIT_CODES = """\
exit codes:
  0  success
  1  invalid input: a policy file, an argument value, an unknown key
  2  usage error: a bad command line, an unreadable or malformed trace
  3  the backend or key store cannot be reached (or its driver is not installed)
"""


class _Failure(Exception):
    """A command gives up: message for stderr, exit code for the shell."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _json(data: object) -> None:
    _out(json.dumps(data, indent=2, ensure_ascii=False))


def _credits(amount: Decimal) -> str:
    """Credits with at least two decimals: ``9999.99``, ``0.125``."""
    if amount == amount.quantize(Decimal("0.01")):
        return f"{amount:.2f}"
    return str(amount.normalize())


def _utc(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    text = moment.isoformat(timespec="milliseconds" if seconds % 1 else "seconds")
    return text.replace("+00:00", "Z")


def _table(rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> Iterator[str]:
    """Rows as aligned columns; columns in ``right`` are right-aligned (numbers)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        parts = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        yield "  " + "  ".join(parts).rstrip()


#: The policy file of ``usage``, ``reset-limits`` and ``simulate`` without ``--policy``.
POLICY_ENV = "METERKIT_POLICY"


def _load_policy(path: str | None, *, required: bool = False) -> Policy:
    """The policy of ``path``, else of ``$METERKIT_POLICY``. Without either: a usage
    error when ``required`` (a command on a real backend must use the app's policy:
    another one names other keys, clears nothing and reports another allowance),
    else the seed's policy (``simulate``, whose report names the policy it used)."""
    from meterkit.core.policy import Policy

    if path is None:
        path = os.environ.get(POLICY_ENV) or None
    if path is None:
        if required:
            raise _Failure(
                f"name your policy with --policy FILE or the {POLICY_ENV} environment "
                "variable: this command reads the backend as that policy laid it out",
                EXIT_USAGE,
            )
        return Policy.crane_ledger()
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise _Failure(f"cannot read policy file {path}: {exc.strerror}", EXIT_USAGE) from None
    except UnicodeDecodeError:
        raise _Failure(f"policy file {path} is not UTF-8 text", EXIT_INVALID) from None
    try:
        return Policy.from_toml(text)
    except ConfigurationError as exc:
        raise _Failure(_policy_error(path, text, exc), EXIT_INVALID) from None


# -- where in a TOML file a policy error is ------------------------------------------


def _split_dotted(header: str) -> list[str]:
    """``operations."invoices.pdf"`` -> ``["operations", "invoices.pdf"]``."""
    parts: list[str] = []
    for match in re.finditer(r'\s*("(?:[^"\\]|\\.)*"|\'[^\']*\'|[^.\s]+)\s*(?:\.|$)', header):
        token = match.group(1)
        parts.append(token[1:-1] if token[:1] in "\"'" else token)
    return parts


def locate(text: str, location: str) -> int | None:
    """The line (1-based) of ``text`` that a policy error's ``location`` points to.

    ``location`` is what :class:`ConfigurationError` names: ``tiers[2].rate``,
    ``operations.invoices.pdf.price``, ``credits.allowance``, ``name``. Table headers
    are matched first, then the key inside the table. None when not found (a policy
    written with inline tables, say).
    """
    if not location:
        return None
    lines = text.splitlines()
    # (location prefix of the table, first line index, end line index)
    tables: list[tuple[str, int, int]] = [("", 0, len(lines))]
    counts: dict[str, int] = {}
    for number, line in enumerate(lines):
        stripped = line.strip()
        match = re.match(r"^(\[\[?)\s*(.+?)\s*\]\]?\s*(#.*)?$", stripped)
        if not match:
            continue
        name = ".".join(_split_dotted(match.group(2)))
        if match.group(1) == "[[":
            index = counts.get(name, 0)
            counts[name] = index + 1
            name = f"{name}[{index}]"
        prev = tables[-1]
        tables[-1] = (prev[0], prev[1], number)
        tables.append((name, number, len(lines)))
    best: tuple[str, int, int] | None = None
    for table in tables:
        prefix = table[0]
        inside = (
            prefix == "" or location == prefix or location.startswith((prefix + ".", prefix + "["))
        )
        if inside and (best is None or len(prefix) > len(best[0])):
            best = table
    if best is None:
        return None
    prefix, first, end = best
    rest = location[len(prefix) :].lstrip(".")
    if not rest:
        return first + 1
    key = re.split(r"[.\[]", rest, maxsplit=1)[0] if rest[:1] not in "'\"" else rest
    key = key.strip("'\"")
    pattern = re.compile(r'^\s*(?:"' + re.escape(key) + r'"|' + re.escape(key) + r")\s*=")
    for number in range(first, end):
        if pattern.match(lines[number]):
            return number + 1
    return first + 1 if prefix else None


def _resolve_entry(text: str, exc: ConfigurationError) -> str:
    """Name the table entry msgspec shows as ``[...]``: ``operations[...].price`` becomes
    ``operations.invoices.pdf.price``, found by validating one entry at a time."""
    import msgspec

    from meterkit.core.policy import _PolicySpec

    head, _, rest = exc.location.partition("[...]")
    try:
        data = msgspec.toml.decode(text)
    except msgspec.DecodeError:
        return exc.location
    table = data.get(head) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        return exc.location
    for name, entry in table.items():
        try:
            msgspec.convert({**data, head: {name: entry}}, _PolicySpec)
        except msgspec.ValidationError as err:
            if str(err).partition(" - at `$")[0] == exc.detail:
                return f"{head}.{name}{rest}"
    return exc.location


def _policy_error(path: str, text: str, exc: ConfigurationError) -> str:
    location = exc.location
    if "[...]" in location:
        location = _resolve_entry(text, exc)
    unknown = re.search(r"unknown field `([^`]+)`", exc.detail)
    line = locate(text, f"{location}.{unknown.group(1)}".lstrip(".")) if unknown else None
    line = line or locate(text, location)
    if line is None:  # a TOML syntax error names its line in its message
        match = re.search(r"\(at line (\d+), column \d+\)", exc.detail)
        line = int(match.group(1)) if match else None
    where = f"{path}:{line}" if line else path
    what = f"{location}: {exc.detail}" if location else exc.detail
    return f"{where}: invalid policy: {what}"
