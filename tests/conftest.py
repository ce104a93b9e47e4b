"""Shared fixtures. Every storage test runs on SQLite and on a real PostgreSQL server.

PostgreSQL comes from ``TOLLWAY_TEST_POSTGRES_URL`` (``make test`` starts a throwaway server
and sets it). Without it the PostgreSQL variants are skipped, loudly, except under CI, where a
missing server is an error: CI must never pass on SQLite alone.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import warnings
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from aiohttp import web

from fake_stripe import FakeStripe
from fakes import (
    FakeUpstream,
    Serving,
    Tollway,
    fake_catalog,
    fresh_database,
    running_tollway,
)
from tollway.store.db import Database, normalize_url
from tollway.store.migrate import upgrade

PG_URL = os.environ.get("TOLLWAY_TEST_POSTGRES_URL")
_counter = itertools.count()


def pytest_report_header() -> str:
    return f"postgresql: {PG_URL or 'NOT CONFIGURED (PostgreSQL variants skipped)'}"


def _pg_admin() -> sa.Engine:
    assert PG_URL
    return sa.create_engine(normalize_url(PG_URL), isolation_level="AUTOCOMMIT",
                            poolclass=sa.pool.NullPool)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database that each test copies (CREATE DATABASE ... TEMPLATE)."""
    if not PG_URL:
        if os.environ.get("CI"):
            pytest.fail("CI needs PostgreSQL: TOLLWAY_TEST_POSTGRES_URL is not set")
        pytest.skip("PostgreSQL not configured (set TOLLWAY_TEST_POSTGRES_URL or run make test)")
    name = f"tollway_tpl_{os.getpid()}"
    admin = _pg_admin()
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    url = str(sa.engine.make_url(normalize_url(PG_URL)).set(database=name)
              .render_as_string(hide_password=False))
    db = Database(url)
    upgrade(db)
    db.dispose()
    yield name
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    """The URL of a fresh, migrated, empty database of each kind."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("db") / "tollway.db"
        url = f"sqlite:///{path}"
        db = Database(url)
        upgrade(db)
        db.dispose()
        yield url
        return
    template = request.getfixturevalue("pg_template")
    name = f"tollway_t{os.getpid()}_{next(_counter)}"
    admin = _pg_admin()
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name} TEMPLATE {template}")
    yield str(sa.engine.make_url(normalize_url(PG_URL or "")).set(database=name)
              .render_as_string(hide_password=False))
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    yield database
    database.dispose()


# --------------------------------------------------------------------------- the gateway
# A gateway module's fixtures (a module may override ``served`` with its own catalog):
# ``upstream`` — one fake upstream per module; ``served`` — one gateway per backend on the fake
# catalog for the whole module; ``tw`` — that gateway for one test, which makes its own
# accounts.


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def serving() -> Serving:
    """Override in a module (it may take other module fixtures) to say what differs."""
    return Serving()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request: pytest.FixtureRequest, upstream: FakeUpstream,
           serving: Serving) -> Iterator[Tollway]:
    catalog = fake_catalog(upstream) if serving.catalog is None else serving.catalog
    with fresh_database(request) as db, running_tollway(db, catalog, upstream, env=serving.env,
                                                        clock=serving.clock) as tollway:
        yield tollway


@pytest.fixture(scope="module")
def stripe_fake() -> Iterator[FakeStripe]:
    """A fake Stripe Checkout API on 127.0.0.1 (``fake_stripe``), one per module."""
    with FakeStripe() as fake:
        yield fake


@pytest.fixture(scope="session")
def localstripe() -> Iterator[str]:
    """localstripe (a stateful fake Stripe from PyPI) in a thread on 127.0.0.1, one per
    session (its aiohttp app is a module global, bound to one event loop): an ephemeral
    port, its store emptied first."""
    with warnings.catch_warnings():  # localstripe routes plain functions (aiohttp deprecates)
        warnings.simplefilter("ignore", DeprecationWarning)
        from localstripe import server  # noqa: PLC0415 - only this module needs it

    server.store.clear()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(server.app, access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port.append(int(runner.addresses[0][1]))
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        pending = asyncio.all_tasks(loop)  # webhooks localstripe has yet to send
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=run, name="localstripe", daemon=True)
    thread.start()
    assert ready.wait(10)
    yield f"http://127.0.0.1:{port[0]}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture
def tw(served: Tollway) -> Iterator[Tollway]:
    served.begin_test()
    yield served
    served.close_clients()
