"""The hash-pinned lock (requirements/lock.txt): it is the lock of pyproject.toml as it is, it
pins every dependency pyproject.toml names to one version with sha256 hashes, and the check
that ``make`` runs refuses a lock whose inputs changed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, list[str]]:
    """{package: its hash options}, checking each entry is `name==version` with hashes."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in LOCK.read_text().splitlines():
        if line.startswith((" ", "\t")):
            if current is not None and line.strip().startswith("--hash=sha256:"):
                entries[current].append(line.strip())
            continue
        if not line or line.startswith("#"):
            current = None
            continue
        requirement = line.split(";")[0].split("\\")[0].strip()
        assert re.fullmatch(r"[A-Za-z0-9._-]+(\[[^\]]*\])?==[^\s]+", requirement), line
        current = canonical(NAME.match(requirement).group(1))  # type: ignore[union-attr]
        entries.setdefault(current, [])
    return entries


def check(lock: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(cwd / "scripts" / "lockfile.py"), "check",
                           str(lock)], capture_output=True, text=True, cwd=cwd)


def test_the_lock_is_current_and_pins_everything_with_hashes() -> None:
    assert check(LOCK, ROOT).returncode == 0
    entries = pinned()
    assert all(hashes for hashes in entries.values()), [n for n, h in entries.items() if not h]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"],
              *project["optional-dependencies"]["otel"], "setuptools"]
    for requirement in wanted:
        name = canonical(NAME.match(requirement).group(1))  # type: ignore[union-attr]
        assert name in entries, f"{name} is not in requirements/lock.txt: run `make lock`"


def test_a_changed_dependency_makes_the_lock_stale(tmp_path: Path) -> None:
    for part in ("pyproject.toml", "requirements", "scripts"):
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, tmp_path / part)
        else:
            shutil.copy(source, tmp_path / part)
    lock = tmp_path / "requirements" / "lock.txt"
    assert check(lock, tmp_path).returncode == 0
    pyproject = tmp_path / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(text.replace('line-length = 100', 'line-length = 99'))
    assert check(lock, tmp_path).returncode == 0  # tool settings do not matter
    pyproject.write_text(text.replace('"pyyaml>=6.0",', '"pyyaml>=6.0",\n    "left-pad",'))
    stale = check(lock, tmp_path)
    assert stale.returncode == 1 and "make lock" in stale.stderr
