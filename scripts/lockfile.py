"""Is requirements/lock.txt the lock of pyproject.toml as it is now?

    python3 scripts/lockfile.py check requirements/lock.txt   # exit 1, saying what to do, if not
    python3 scripts/lockfile.py stamp requirements/lock.txt   # after `uv pip compile` (make lock)

The lock's last line records a digest of what it was made from: the project's dependencies, its
optional dependencies and its build requirements in pyproject.toml, and requirements/build.in.
Nothing else in pyproject.toml (tool settings, the version) makes the lock stale.
Standard library only: it runs before any virtualenv exists.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "# lock-inputs-sha256: "


def digest() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    inputs = {
        "dependencies": project["project"].get("dependencies", []),
        "optional-dependencies": project["project"].get("optional-dependencies", {}),
        "build-system": project.get("build-system", {}).get("requires", []),
        "build.in": (ROOT / "requirements" / "build.in").read_text(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def recorded(lock: Path) -> str | None:
    if not lock.exists():
        return None
    for line in lock.read_text().splitlines():
        if line.startswith(MARK):
            return line[len(MARK):].strip()
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("check", "stamp"):
        print(__doc__, file=sys.stderr)
        return 2
    command, lock = argv[0], Path(argv[1])
    if command == "stamp":
        lines = [line for line in lock.read_text().splitlines() if not line.startswith(MARK)]
        lock.write_text("\n".join([*lines, MARK + digest()]) + "\n")
        return 0
    if recorded(lock) != digest():
        print(f"error: {lock} is not the lock of pyproject.toml's dependencies as they are now "
              "(they changed, or the lock was edited by hand).\n"
              "Run `make lock` to regenerate it (hash-pinned, from PyPI), review the diff, and "
              "commit both files.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
