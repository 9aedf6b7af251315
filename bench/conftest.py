"""Collect ``bench_*.py`` files and print every benchmark's figures in one block.

Benchmarks call the ``figures`` fixture to report a line (a ratio, a memory
figure); the lines are printed together at the end of the run, under the
pytest-benchmark table, whether or not output capture (``-s``) is on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

_LINES: list[str] = []


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # pytest collects test_*.py on its own, and any file named on the command line.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        module: pytest.Module = pytest.Module.from_parent(parent, path=file_path)
        return module
    return None


@pytest.fixture
def figures() -> Callable[[str], None]:
    """Report one line of figures: printed at once and again in the end-of-run summary."""

    def report(line: str) -> None:
        print(line, flush=True)
        _LINES.append(line)

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _LINES:
        terminalreporter.section("meterkit bench figures")
        for line in _LINES:
            terminalreporter.write_line(line)
