"""Build meterkit's optional C extension (meterkit/_speedups.c) with the wheel.

Hatchling calls this hook for wheels and for editable installs. It compiles the one C
file with the C compiler this Python was built with, against this Python's headers,
and puts the module next to the sources (an editable install imports it from there)
and into the wheel, which then gets a platform tag.

Without a working compiler the build goes on in pure Python (meterkit runs the same,
only slower) -- unless METERKIT_REQUIRE_SPEEDUPS=1, which CI sets: then it fails.
METERKIT_NO_SPEEDUPS=1 skips the compiler altogether.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("meterkit") / "_speedups.c"


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def compile_speedups(root: Path) -> Path:
    """Compile meterkit/_speedups.c under ``root``; return the module's path."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = root / "meterkit" / f"_speedups{suffix}"
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    include = sysconfig.get_paths()["include"]
    ldshared = (
        ["-bundle", "-undefined", "dynamic_lookup"] if sys.platform == "darwin" else ["-shared"]
    )
    cmd = [
        *cc,
        "-O2",
        "-fPIC",
        "-std=c11",
        "-Wall",
        "-Werror=implicit-function-declaration",
        f"-I{include}",
        str(root / SOURCE),
        *ldshared,
        "-o",
        str(target),
        "-lm",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return target


class SpeedupsHook(BuildHookInterface):
    """Compile the C extension into the source tree and ship it in the wheel."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or _flag("METERKIT_NO_SPEEDUPS"):
            return
        root = Path(self.root)
        try:
            target = compile_speedups(root)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            if _flag("METERKIT_REQUIRE_SPEEDUPS"):
                raise RuntimeError(f"compiling {SOURCE} failed:\n{detail}") from exc
            print(f"meterkit: {SOURCE} not compiled, pure Python only:\n{detail}", file=sys.stderr)
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":
            build_data["force_include"][str(target)] = f"meterkit/{target.name}"
