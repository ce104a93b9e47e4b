"""What every benchmark records about the machine it ran on (the figures are only comparable
within one run on one machine, so each result file says which)."""

from __future__ import annotations

import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages ("?" where /proc is missing)."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def git_commit() -> str:
    """The checkout's ``git describe --always --dirty`` ("?" outside a checkout)."""
    try:
        commit = subprocess.run(["git", "-C", HERE, "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or "?"
