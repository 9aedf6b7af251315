"""The Lua scripts: package data (``lua/``), joined to their shared helpers and sent by
SHA. After ``NOSCRIPT`` (``SCRIPT FLUSH``, a restart, a failover to a replica that
never saw them) a command goes again as ``EVAL`` with the script's text, which
registers it again; the text travels with the call, so no other flush can come
between a load and its use.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from meterkit.errors import BackendError

__all__ = ["RAW", "Command", "Script", "as_eval", "pack", "script"]

Command = list[Any]


def _lua(name: str) -> str:
    return (
        resources.files("meterkit.backends.redis")
        .joinpath("lua")
        .joinpath(f"{name}.lua")
        .read_text("utf-8")
    )


_CHECK = "local function check("


def _inline(check: str, driver: str) -> str:
    """check.lua with its function's body run inline after ``driver`` (which binds the
    parameters): one request per call needs no function, which Redis would make anew
    on every call."""
    helpers, rest = check.split(_CHECK, 1)
    body, end = rest.split(")\n", 1)[1].rsplit("\nend", 1)
    assert not end.strip(), "check.lua ends with its check function"
    return helpers + driver + body + "\n"


class Script:
    """One Lua script: the shared helpers, generated lines (a check's parameters),
    then its own files; sent by SHA."""

    __slots__ = ("sha", "text")

    def __init__(self, name: str, line: str = "") -> None:
        if name == "check+check_one":
            body = _inline(_lua("check"), _lua("check_one"))
        else:
            body = "".join(_lua(part) for part in name.split("+"))
        self.text = _lua("common") + "\n" + line + body
        self.sha = hashlib.sha1(self.text.encode("utf-8")).hexdigest()


_SCRIPTS: dict[str, Script] = {}


def script(name: str, line: str = "") -> Script:
    """The script ``name`` (files joined by ``+``, after ``line``), made once."""
    script = _SCRIPTS.get(name + line)
    if script is None:
        script = _SCRIPTS[name + line] = Script(name, line)
    return script


#: What redis-py's clients are told so that replies come as bytes even from a client
#: made with ``decode_responses=True`` (a check's reply is binary).
RAW: dict[str, Any] = {"NEVER_DECODE": []}


def as_eval(cmd: Command) -> Command:
    """The same script call with the script's text: the answer to ``NOSCRIPT``."""
    for script in _SCRIPTS.values():
        if script.sha == cmd[1]:
            return ["EVAL", script.text, *cmd[2:]]
    raise BackendError("NOSCRIPT for a script meterkit does not know")  # pragma: no cover


def pack(cmd: Command) -> bytes:
    """One command in the Redis protocol (hiredis's C packer when it is installed)."""
    return _hiredis_pack(tuple(cmd))  # type: ignore[no-any-return]


def _pack_python(cmd: Command) -> bytes:
    out = [b"*%d\r\n" % len(cmd)]
    for arg in cmd:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis comes with meterkit[redis]
    pack = _pack_python
