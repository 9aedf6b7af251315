"""FastAPI routes that name their operation (``from meterkit.fastapi import Metered``); it
lives in :mod:`meterkit.http.fastapi`, beside the gate it shells."""

from __future__ import annotations

from meterkit.http.fastapi import Metered, Refusal

__all__ = ["Metered", "Refusal"]
