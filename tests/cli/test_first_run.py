"""The first run, as a new user meets it: a Python without its venv module is named with the
exact package to install before anything is made; a second ``make serve`` on a busy port stops
before printing keys; the demo customer's console password is replaced once it no longer
signs in (tests/api/test_http.py's real ``make serve`` run signs in with the printed one, and
checks it is kept in var/ with mode 600 and reused); a YAML syntax error names the file, line
and column on one line.

The interpreter without venv is a real one with ``ensurepip`` hidden, as on a stock Debian
machine without python3-venv: a wrapper script that puts a package of that name, which fails
to import, first on its path.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tollway import server
from tollway.billing import logins
from tollway.cli import main
from tollway.store import accounts as account_store
from tollway.store.db import Database

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "examples" / "catalog.yaml"
VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    return {**env, **extra}


# --------------------------------------------------------------------------- prerequisites


@pytest.fixture
def python_without_venv(tmp_path: Path) -> Path:
    """``bin/python3``: this interpreter, but ``import ensurepip`` fails as it does on Debian
    without python3.X-venv."""
    hidden = tmp_path / "hide"
    (hidden / "ensurepip").mkdir(parents=True)
    (hidden / "ensurepip" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'ensurepip'\", name='ensurepip')\n")
    real = Path(sys.base_prefix) / "bin" / f"python{VERSION}"
    assert real.exists(), real
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nPYTHONPATH="{hidden}" exec "{real}" "$@"\n')
    fake.chmod(0o755)
    probe = subprocess.run([str(fake), "-c", "import ensurepip"], capture_output=True,
                           text=True)
    assert probe.returncode == 1 and "No module named 'ensurepip'" in probe.stderr
    return fake


def fix_line(stderr: str) -> str:
    sudo = "" if os.geteuid() == 0 else "sudo "
    line = f"tollway:   Install it with: {sudo}apt-get install python{VERSION}-venv"
    assert line in stderr.splitlines(), stderr
    return line


def test_check_python_names_the_venv_package_of_the_interpreter(
        python_without_venv: Path) -> None:
    run = subprocess.run(["sh", str(ROOT / "scripts" / "check-python"), "python3"],
                         capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{python_without_venv.parent}:"
                                                    f"{os.environ['PATH']}"})
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.splitlines()[0] == (
        f"tollway: python3 (Python {VERSION}) cannot create a virtualenv: its venv/ensurepip "
        "module is missing.")
    fix_line(run.stderr)
    assert "Traceback" not in run.stderr


def test_check_python_passes_a_python_that_has_venv() -> None:
    run = subprocess.run(["sh", str(ROOT / "scripts" / "check-python"), sys.executable],
                         capture_output=True, text=True)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")


@pytest.mark.parametrize("problem", ["missing", "old"])
def test_check_python_missing_or_old_interpreter(tmp_path: Path, problem: str) -> None:
    python = tmp_path / "python3"
    if problem == "old":
        python.write_text('#!/bin/sh\necho 3.9\n')  # answers the version probe like 3.9
        python.chmod(0o755)
    run = subprocess.run(["sh", str(ROOT / "scripts" / "check-python"), str(python)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ""
    first = run.stderr.splitlines()[0]
    assert first == (f"tollway: {python} not found: Tollway needs Python 3.11 or newer."
                     if problem == "missing" else
                     f"tollway: {python} is Python 3.9: Tollway needs Python 3.11 or newer.")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", ["serve", "test", "install"])
def test_make_stops_before_making_the_venv(tmp_path: Path, python_without_venv: Path,
                                           target: str) -> None:
    """``make serve`` (test, install) in a fresh copy of the project: the fix, exit 2 (make's
    failure), and no half-made .venv left behind."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, project / name)
    for name in ("scripts", "requirements"):
        shutil.copytree(ROOT / name, project / name)
    run = subprocess.run(["make", target], cwd=project, capture_output=True, text=True,
                         env={**clean_env(), "PATH": f"{python_without_venv.parent}:"
                                                     f"{os.environ['PATH']}"}, timeout=60)
    assert run.returncode == 2, (run.stdout, run.stderr)
    fix_line(run.stderr)
    assert "Traceback" not in run.stderr and "-m venv" not in run.stdout
    assert not (project / ".venv").exists()


# --------------------------------------------------------------------------- tollway serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'tollway.db'}"
    assert main(["db", "upgrade", "--database-url", url]) == 0
    return url


def serve_command(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tollway.cli", "serve", "--port", str(port), "--demo",
            *extra]


def test_a_busy_port_fails_before_any_key_is_made_or_printed(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    data = tmp_path / "var"
    with socket.socket() as busy:  # a real listener, as another `make serve` has
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run(serve_command(port, "--catalog", str(CATALOG)),
                             capture_output=True, text=True, timeout=60,
                             env=clean_env(TOLLWAY_DATABASE_URL=sqlite_url,
                                           TOLLWAY_DATA_DIR=str(data)))
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == (
        f"tollway: error: port {port} on 127.0.0.1 is already in use (another `make serve`?): "
        f"stop it, or serve on another port: make serve PORT={port + 1} (tollway serve "
        f"--port {port + 1})\n")
    assert not data.exists()  # no admin token, demo key or password made
    db = Database(sqlite_url)
    try:
        with db.read() as conn:
            assert account_store.list_accounts(conn) == []  # no demo account, no catalog
    finally:
        db.dispose()


def test_demo_password_is_replaced_when_it_no_longer_signs_in(db: Database,
                                                              tmp_path: Path) -> None:
    """The kept password is reused while it signs in; once the operator set another (or the
    database is new), a new one is made, set and kept."""
    server.ensure_demo(db, tmp_path)
    first = server.ensure_demo_password(db, tmp_path)
    assert server.ensure_demo_password(db, tmp_path) == first
    other = logins.hash_password("the operator's own")
    with db.write() as conn:
        logins.set_password_hash(conn, account_store.find_account(conn, "demo").id, other)
    second = server.ensure_demo_password(db, tmp_path)
    assert second != first
    assert (tmp_path / "demo-password").read_text() == second + "\n"
    with db.read() as conn:
        assert logins.authenticate(conn, "demo", second) is not None
        assert logins.authenticate(conn, "demo", first) is None


# --------------------------------------------------------------------------- catalogs


BROKEN = """\
providers:
  sandbox: {kind: sandbox}
models:
  - id: m
    provider: sandbox
    price: {input: "0.15", output: "0.60"
"""
# PyYAML: line 7, column 1 (the end of the file): expected ',' or '}', but got '<stream end>'
# in the flow mapping that starts at line 6, column 12.
PROBLEM = ("line 7, column 1: not valid YAML: expected ',' or '}', but got '<stream end>' "
           "(while parsing a flow mapping from line 6, column 12)")


def test_yaml_syntax_error_names_file_line_and_column_on_one_line(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text(BROKEN)
    capsys.readouterr()
    assert main(["catalog", "apply", str(bad), "--database-url", sqlite_url]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"tollway: error: invalid catalog: {bad}: {PROBLEM}\n")

    # `tollway serve --catalog` (the real script): the same line, before anything is printed
    run = subprocess.run(serve_command(free_port(), "--catalog", str(bad)),
                         capture_output=True, text=True, timeout=60,
                         env=clean_env(TOLLWAY_DATABASE_URL=sqlite_url,
                                       TOLLWAY_DATA_DIR=str(tmp_path / "var")))
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == f"tollway: error: invalid catalog: {bad}: {PROBLEM}\n"


@pytest.mark.parametrize(("text", "problem"), [
    ("models: [1", ("line 1, column 11: not valid YAML: expected ',' or ']', but got "
                    "'<stream end>' (while parsing a flow sequence from line 1, column 9)")),
    ("groups:\n  default: {ratio: 1}\n\tvip: {ratio: 2}\n",
     ("line 3, column 1: not valid YAML: found character '\\t' that cannot start any token "
      "(while scanning for the next token)")),
    ("groups: x: y", "line 1, column 10: not valid YAML: mapping values are not allowed here"),
    ("groups:\n  default: {ratio: \x00}\n", ("line 2, column 20: not valid YAML: special "
                                             "characters are not allowed (#x0000)")),
])
def test_every_yaml_error_is_one_line_with_its_place(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str], text: str,
        problem: str) -> None:
    bad = tmp_path / "cat.yaml"
    bad.write_text(text)
    capsys.readouterr()
    assert main(["catalog", "apply", str(bad), "--database-url", sqlite_url]) == 1
    assert capsys.readouterr().err == f"tollway: error: invalid catalog: {bad}: {problem}\n"


def test_a_catalog_that_is_not_utf8_is_one_line(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("groups: {caf\u00e9: {ratio: 1}}\n".encode("latin-1"))
    capsys.readouterr()
    assert main(["catalog", "apply", str(bad), "--database-url", sqlite_url]) == 1
    assert capsys.readouterr().err == (
        f"tollway: error: invalid catalog: {bad}: not UTF-8 text (byte 12)\n")
