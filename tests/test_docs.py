"""The documentation runs: every Python example, the CLI usage, the site build, the plots.

Every ```python block of docs/*.md and README.md is executed, the blocks of one page in
order in one namespace (a page reads like one session). A block is skipped only when
the line before its fence is ``<!-- no-run: reason -->``: for code that needs a library
meterkit does not depend on. A block that uses ``redis://localhost:6379`` runs against
the test session's real Redis instead.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from meterkit.cli.parser import _parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<info>[^`]*)$")
NO_RUN = re.compile(r"^\s*<!--\s*no-run:\s*\S.*-->\s*$")
LOCAL_REDIS = "redis://localhost:6379"


@dataclass
class Block:
    path: Path
    line: int  # of the first line of code
    language: str
    code: str
    run: bool


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with their languages and run marks."""
    found: list[Block] = []
    lines = path.read_text("utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match.group("fence"), len(match.group("indent"))
        language = (match.group("info").split() or [""])[0].lower()
        previous = next((x for x in reversed(lines[:i]) if x.strip()), "")
        start = i + 1
        i = start
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        code = "\n".join(line[indent:] for line in lines[start:i])
        found.append(Block(path, start + 1, language, code, not NO_RUN.match(previous)))
        i += 1
    return found


def python_blocks(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.language in ("python", "py", "python3")]


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def run_page(page: Path, redis: str | None = None, main: bool = False) -> None:
    """Run a page's Python blocks in order, in one namespace (no-run blocks excepted);
    ``main``: as the ``__main__`` module itself, as ``python page.py`` would."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    if main:
        module = types.ModuleType("__main__")
        sys.modules["__main__"] = module
        namespace = module.__dict__
    for block in python_blocks(page):
        if not block.run:
            continue
        code = block.code
        if LOCAL_REDIS in code:
            assert redis is not None
            code = code.replace(LOCAL_REDIS, redis)
        # Leading newlines make tracebacks point at the Markdown file's own lines.
        compiled = compile("\n" * (block.line - 1) + code, str(block.path), "exec")
        exec(compiled, namespace)


#: A page that configures a process-wide framework (Django's settings, made once per
#: process) runs in a fresh interpreter, as a reader's script would.
ALONE = re.compile(r"^settings\.configure\(", re.MULTILINE)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=_page_id)
def test_every_python_example_runs(
    page: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each page's Python blocks run in order without error (no-run blocks excepted)."""
    text = page.read_text("utf-8")
    redis = request.getfixturevalue("redis_url").rsplit("/", 1)[0] if LOCAL_REDIS in text else None
    if ALONE.search(text):
        runner = "import sys, pathlib; from tests.test_docs import run_page; "
        runner += "run_page(pathlib.Path(sys.argv[1]), sys.argv[2] or None, main=True)"
        proc = subprocess.run(
            [sys.executable, "-c", runner, str(page), redis or ""],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return
    run_page(page, redis)
    capsys.readouterr()


def test_no_run_marks_are_rare_and_say_why() -> None:
    """Skipped blocks carry a reason, and most Python examples in the docs do run."""
    every = [b for page in PAGES for b in python_blocks(page)]
    skipped = [b for b in every if not b.run]
    assert len(skipped) * 4 <= len(every), [f"{b.path.name}:{b.line}" for b in skipped]
    for page in PAGES:
        text = page.read_text("utf-8")
        assert "<!-- no-run -->" not in text, f"{page.name}: give the no-run mark a reason"


def test_the_block_finder_sees_marks_and_languages(tmp_path: Path) -> None:
    """The extractor finds fenced blocks, their language, line and no-run mark."""
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nx = 1\n```\n\n<!-- no-run: needs a server -->\n"
        '```python title="app.py"\nimport nothing\n```\n\n```toml\na = 1\n```\n',
        encoding="utf-8",
    )
    found = blocks(page)
    assert [(b.language, b.line, b.code, b.run) for b in found] == [
        ("python", 4, "x = 1", True),
        ("python", 9, "import nothing", False),
        ("toml", 13, "a = 1", True),
    ]


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, str]:
    """Every leaf command's usage text, as --help prints it 100 columns wide."""
    found: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_subcommands(sub, f"{prefix} {name}".strip()))
    if not found and prefix:
        found[prefix] = parser.format_usage().strip()
    return found


def test_the_cli_reference_shows_every_command_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/cli.md has each command's usage exactly as the parser prints it."""
    monkeypatch.setenv("COLUMNS", "100")
    reference = (DOCS / "cli.md").read_text("utf-8")
    usages = _subcommands(_parser())
    assert set(usages) >= {"demo", "policy check", "simulate", "usage", "keys create"}
    for command, usage in usages.items():
        assert f"## `meterkit {command}`" in reference, command
        assert f"```text\n{usage}\n```" in reference, f"{command}: update docs/cli.md\n{usage}"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict` passes: nav, links, anchors and included files are sound."""
    pytest.importorskip("mkdocs", reason="mkdocs-material is in the docs extra")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "algorithms" / "index.html").exists()


def test_the_algorithm_plots_are_drawn_small(tmp_path: Path) -> None:
    """docs/plots.py draws one PNG per algorithm with the simulator, each under 100 KB."""
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(DOCS))
    try:
        import plots
    finally:
        sys.path.remove(str(DOCS))
    written = plots.main(tmp_path)
    assert sorted(p.name for p in written) == sorted(
        p.name for p in (DOCS / "img").glob("algorithm-*.png")
    )
    for path in written:
        assert path.read_bytes()[:4] == b"\x89PNG"
        assert path.stat().st_size < 100_000
