"""What the ``meterkit`` commands share: exit codes, output and policy loading (a
policy error names its file's line: :func:`meterkit.core.toml.error_line`)."""

from __future__ import annotations

import json
import os
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

__all__ = ["EXIT_BACKEND", "EXIT_INVALID", "EXIT_OK", "EXIT_USAGE"]

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


def _policy_error(path: str, text: str, exc: ConfigurationError) -> str:
    from meterkit.core.toml import error_line

    location, line = error_line(text, exc)
    where = f"{path}:{line}" if line else path
    what = f"{location}: {exc.detail}" if location else exc.detail
    return f"{where}: invalid policy: {what}"
