"""``tollway serve``: prepare the database, optionally the demo, then run uvicorn."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from pathlib import Path

import uvicorn

from tollway import clock, settings
from tollway.billing import credits
from tollway.billing import keys as key_ops
from tollway.errors import AuthenticationError, InvalidRequest
from tollway.logs import log_config
from tollway.metrics_files import MULTIPROC_ENV, prepare_directory
from tollway.pricing.catalog import load_catalog
from tollway.store import accounts as store
from tollway.store.catalog import apply_catalog
from tollway.store.db import Database
from tollway.store.migrate import current_revision, head_revision

DEMO_ACCOUNT = "demo"
DEMO_CREDIT_NANO = 10 * 1_000_000_000


def admin_token(data_dir: Path) -> str:
    """``TOLLWAY_ADMIN_TOKEN``, else the token kept in DATA_DIR/admin-token (made once)."""
    token = settings.get("admin_token")
    if token:
        return token
    path = data_dir / "admin-token"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    token = "twadm-" + secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


def ensure_demo(db: Database, data_dir: Path) -> str:
    """A demo account with $10 of credit and a key, kept in DATA_DIR/demo-key (mode 600)."""
    path = data_dir / "demo-key"
    with db.write() as conn:
        try:
            account = store.find_account(conn, DEMO_ACCOUNT)
        except Exception:  # noqa: BLE001 - UnknownAccount: make it
            account = store.create_account(conn, DEMO_ACCOUNT, "default", at_ms=clock.now_ms())
        credits.topup(conn, account.id, DEMO_CREDIT_NANO, idempotency_key="demo:initial-credit",
                      note="demo credit", at_ms=clock.now_ms())
        if path.exists():
            secret = path.read_text().strip()
            try:
                key_ops.authenticate(conn, secret, now_ms=clock.now_ms())
                return secret
            except AuthenticationError:
                pass
        new = key_ops.create_key(conn, account.id, at_ms=clock.now_ms(), name="demo")
    data_dir.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(new.secret + "\n")
    return new.secret


def share_metrics(port: int, data_dir: Path) -> None:
    """Give the workers one emptied metrics directory (prometheus_client's multiprocess mode,
    chosen when it is imported: the app, and so the metrics, are imported after this) and an
    ``instance`` label."""
    directory = Path(settings.get("metrics_dir") or data_dir / "metrics" / str(port)).resolve()
    prepare_directory(directory)
    os.environ[MULTIPROC_ENV] = str(directory)
    from tollway.metrics import multiprocess  # only now: see above

    assert multiprocess(), "prometheus_client was imported before its directory was set"
    instance = settings.Setting("instance", "", "").env
    os.environ[instance] = os.environ.get(instance) or f"{socket.gethostname()}:{port}"


def serve(args: argparse.Namespace) -> None:
    config = log_config(settings.get("log_format"))  # refuse a bad format before anything
    db = Database(args.database_url)
    if current_revision(db) != head_revision():
        raise InvalidRequest("the database is not up to date: run `tollway db upgrade` first")
    data_dir = Path(settings.get("data_dir"))
    if args.catalog:
        with db.write() as conn:
            report = apply_catalog(conn, load_catalog(args.catalog), now_ms=clock.now_ms())
        print(f"catalog {args.catalog}: {len(report.new_versions)} new price versions, "
              f"{len(report.unchanged)} unchanged", file=sys.stderr)
    token = admin_token(data_dir)
    base = f"http://{args.host}:{args.port}"
    lines = [f"Tollway on {base}", f"  admin token : {token}"]
    if args.demo:
        demo_key = ensure_demo(db, data_dir)
        lines += [f"  demo key    : {demo_key}",
                  f"  try         : curl {base}/v1/marketplace",
                  (f"                curl -H 'Authorization: Bearer {demo_key}' "
                   f"{base}/v1/billing/balance")]
    db.dispose()
    print("\n".join(lines), flush=True)
    os.environ[settings.Setting("database_url", "", "").env] = args.database_url
    os.environ[settings.Setting("admin_token", "", "").env] = token
    share_metrics(args.port, data_dir)
    uvicorn.run("tollway.app:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="info", access_log=False,
                log_config=config)
