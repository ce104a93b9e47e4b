"""The directory where a server's workers keep their metric values (prometheus_client's
multiprocess mode). Apart from :mod:`tollway.metrics` because it must be prepared *before*
prometheus_client is imported: that import decides, from ``PROMETHEUS_MULTIPROC_DIR``, whether
values live in files."""

from __future__ import annotations

from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: One empty file per worker that served (``worker_<pid>``; not ``*.db``, which the merge reads).
WORKER_MARK = "worker_"


def prepare_directory(path: Path) -> None:
    """Make ``path`` the server's empty metrics directory (values from an earlier run would
    otherwise be added to this one's)."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_file() and (entry.suffix == ".db" or entry.name.startswith(WORKER_MARK)):
            entry.unlink()
