"""A griffe extension for the API reference: meterkit's docstrings use reST roles
(:class:`~meterkit.Decision`) and ``literals``; mkdocstrings renders Markdown, so
both become code spans (``Decision``, ``literals``) before rendering. Loaded by
mkdocs.yml; not a page."""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|attr|mod|data|exc|obj|const):`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class ReSTRoles(griffe.Extension):
    """Turn reST roles and double-backquoted literals into Markdown code spans."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _LITERAL.sub(r"`\1`", _ROLE.sub(_role, obj.docstring.value))
