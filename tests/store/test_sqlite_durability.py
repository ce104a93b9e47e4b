"""``TOLLWAY_SQLITE_SYNCHRONOUS``: SQLite's durability mode, ``normal`` unless set to ``full``
(WAL either way); a bad value is refused with a message naming the setting, before any
connection is opened. (Both modes keep every acknowledged charge through a SIGKILL:
``tests/reliability/test_reliability_crash.py`` runs in each.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tollway.errors import InvalidRequest
from tollway.store.db import Database

#: SQLite's numbers for PRAGMA synchronous
FULL, NORMAL = 2, 1


def pragmas(db: Database) -> tuple[str, int, int]:
    """(journal_mode, synchronous on a read connection, on a write connection)"""
    with db.read() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        read = conn.exec_driver_sql("PRAGMA synchronous").scalar()
    with db.write() as conn:
        write = conn.exec_driver_sql("PRAGMA synchronous").scalar()
    return str(mode), int(read or 0), int(write or 0)


@pytest.mark.parametrize(("env", "argument", "expected"), [
    (None, None, NORMAL),  # the default
    ("full", None, FULL),
    ("normal", None, NORMAL),
    ("normal", "full", FULL),  # an explicit argument wins over the environment
    (None, "normal", NORMAL),
])
def test_sqlite_synchronous_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 env: str | None, argument: str | None, expected: int) -> None:
    if env is None:
        monkeypatch.delenv("TOLLWAY_SQLITE_SYNCHRONOUS", raising=False)
    else:
        monkeypatch.setenv("TOLLWAY_SQLITE_SYNCHRONOUS", env)
    db = Database(f"sqlite:///{tmp_path / 'tollway.db'}", synchronous=argument)
    try:
        assert pragmas(db) == ("wal", expected, expected)
    finally:
        db.dispose()


@pytest.mark.parametrize("value", ["FULL", "off", "extra", " normal"])
def test_a_bad_sqlite_synchronous_value_is_refused(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   value: str) -> None:
    monkeypatch.setenv("TOLLWAY_SQLITE_SYNCHRONOUS", value)
    with pytest.raises(InvalidRequest) as err:
        Database(f"sqlite:///{tmp_path / 'tollway.db'}")
    assert err.value.message == ("TOLLWAY_SQLITE_SYNCHRONOUS must be one of full, normal, "
                                 f"got {value!r}")
    assert not (tmp_path / "tollway.db").exists()
