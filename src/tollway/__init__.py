"""Tollway: a self-hostable API marketplace gateway with exact usage-based billing."""

from __future__ import annotations

__version__ = "0.1.0"
