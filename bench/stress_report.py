"""Print the summary table of a ``make stress`` run from its JSON lines.

    python bench/stress_report.py var/stress/results.jsonl [var/stress/soak.jsonl ...]

Each line is one result: the reliability tests write theirs when ``TOLLWAY_STRESS_REPORT``
names a file (tests/cluster.py ``report``), ``bench/soak.py --json FILE`` its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    rows = []
    for name in sys.argv[1:]:
        path = Path(name)
        if path.exists():
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        print("no results")
        return
    width = max(len(r["test"]) for r in rows)
    print(f"{'test':<{width}}  result")
    print(f"{'-' * width}  {'-' * 60}")
    for row in rows:
        test = row.pop("test")
        row.pop("rss_mib_samples", None)
        figures = ", ".join(f"{k}={v}" for k, v in row.items())
        print(f"{test:<{width}}  {figures}")


if __name__ == "__main__":
    main()
