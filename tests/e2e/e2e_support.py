"""What the end-to-end tests share besides fixtures: paths, Chromium's flags, the server."""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "var" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def publish(path: str | Path, name: str) -> None:
    """Copy a screenshot to docs/screenshots/ (the README's) when
    ``TOLLWAY_UPDATE_SCREENSHOTS=1``; otherwise it stays an artifact in var/screenshots/, so a
    test run leaves the checkout clean."""
    if os.environ.get("TOLLWAY_UPDATE_SCREENSHOTS") == "1":
        docs = ROOT / "docs" / "screenshots"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, docs / name)


@dataclass(frozen=True)
class Server:
    base_url: str
    admin_token: str
    database_url: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
