"""Reading a ``/metrics`` answer: every sample as ``{'name{labels}': value}``, the labels in a
canonical order (so a test may write them in any order), the ``instance`` label checked on
every sample and left out of the keys."""

from __future__ import annotations

import re

LINE = re.compile(r'^([a-z_]+)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')


def canonical(key: str) -> str:
    """``name{b="2",a="1"}`` → ``name{a="1",b="2"}``; bucket bounds as floats (``le="1.0"``)."""
    name, _, rest = key.partition("{")
    labels = dict(LABEL.findall(rest))
    if "le" in labels and labels["le"] != "+Inf":
        labels["le"] = repr(float(labels["le"]))
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


class Samples(dict[str, float]):
    """Looked up by any label order."""

    def __getitem__(self, key: str) -> float:
        return super().__getitem__(canonical(key))

    def get(self, key: str, default: float | None = None) -> float | None:  # type: ignore[override]
        return super().get(canonical(key), default)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(canonical(key))


def parse(text: str, instance: str) -> Samples:
    """Every sample of a text exposition, checking each line's syntax and its instance."""
    samples = Samples()
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = LINE.match(line)
        assert match, line
        name, labels, value = match.groups()
        found = dict(LABEL.findall(labels or ""))
        assert found.pop("instance", None) == instance, line
        key = canonical(name + "{" + ",".join(f'{k}="{v}"' for k, v in found.items()) + "}")
        assert key not in samples, f"duplicate series {line}"
        dict.__setitem__(samples, key, float(value))
    return samples


def delta(before: Samples, after: Samples, name: str) -> float:
    return (after.get(name) or 0) - (before.get(name) or 0)
