"""``tollway serve``: prepare the database, optionally the demo, then run uvicorn."""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import socket
import sys
from pathlib import Path

import uvicorn

from tollway import clock, settings
from tollway.billing import credits, logins
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


def keep_secret(path: Path, secret: str) -> None:
    """Write a generated secret for its owner's eyes only: mode 600, also when the file was
    there before with a wider mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on before anything is set up or printed: uvicorn
    finds out only after the keys are printed, and a second ``make serve`` would look as if it
    were serving. Bound the way uvicorn binds (SO_REUSEADDR, so a port left in TIME_WAIT by a
    server that just stopped is not refused), then released for uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                other = port + 1 if port < 65535 else 8081
                raise InvalidRequest(
                    f"port {port} on {host} is already in use (another `make serve`?): stop "
                    f"it, or serve on another port: make serve PORT={other} (tollway serve "
                    f"--port {other})") from None
            raise InvalidRequest(f"cannot serve on {host}:{port}: "
                                 f"{exc.strerror or exc}") from None


def admin_token(data_dir: Path) -> str:
    """``TOLLWAY_ADMIN_TOKEN``, else the token kept in DATA_DIR/admin-token (made once)."""
    token = settings.get("admin_token")
    if token:
        return token
    path = data_dir / "admin-token"
    if path.exists():
        return path.read_text().strip()
    token = "twadm-" + secrets.token_urlsafe(24)
    keep_secret(path, token)
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
    keep_secret(path, new.secret)
    return new.secret


def ensure_demo_password(db: Database, data_dir: Path) -> str:
    """The demo account's console password, kept in DATA_DIR/demo-password (mode 600): the one
    there while it still signs in, else a new one (a new database, or the operator changed
    it), set on the account. Call after :func:`ensure_demo` made the account."""
    path = data_dir / "demo-password"
    kept = path.read_text().strip() if path.exists() else None
    with db.read() as conn:
        found = store.login_row(conn, DEMO_ACCOUNT)
    if kept and found is not None and logins.verify_password(kept, found[1]):
        return kept
    password = secrets.token_urlsafe(12)
    password_hash = logins.hash_password(password)  # scrypt, outside the write transaction
    with db.write() as conn:
        logins.set_password_hash(conn, store.find_account(conn, DEMO_ACCOUNT).id,
                                 password_hash)
    keep_secret(path, password)
    return password


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
    # X-Forwarded-For / -Proto are believed only from TOLLWAY_TRUSTED_PROXIES: uvicorn's own
    # default trusted 127.0.0.1, so a local process (or a local proxy that passes the header
    # on as the client sent it) could pick the address a key's allowlist sees
    raw = [p for p in settings.get("trusted_proxies").split(",") if p.strip()]
    proxies = list(key_ops.parse_networks(raw)) if raw else []
    check_port_free(args.host, args.port)  # before the catalog, the demo and the keys
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
        demo_password = ensure_demo_password(db, data_dir)
        lines += [f"  demo key    : {demo_key}",
                  (f"  console     : {base}/login  (login: {DEMO_ACCOUNT}, "
                   f"password: {demo_password})"),
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
                log_config=config, proxy_headers=bool(proxies),
                forwarded_allow_ips=proxies or None)
