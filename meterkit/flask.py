"""Flask views that name their operation (``from meterkit.flask import Metered``); it lives
in :mod:`meterkit.http.flask`, beside the gate it shells."""

from __future__ import annotations

from meterkit.http.flask import Metered

__all__ = ["Metered"]
