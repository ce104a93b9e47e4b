"""Hypothesis over catalog files: random text, random YAML structures and near-valid catalogs
(the example catalog with one field replaced, removed or added, or one value replaced by a
tricky YAML scalar). The loader either accepts the file or raises the documented
:class:`~tollway.errors.CatalogError`, whose every problem names the file and (for an item)
the item and field; never any other exception. What it accepts, the store applies (SQLite and
PostgreSQL) without any error but a :class:`~tollway.errors.TollwayError`.

``make test`` runs a few derandomized examples of each; ``make stress`` (marker ``stress``)
runs ``TOLLWAY_STRESS_EXAMPLES`` (default 2000) random ones.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import fresh_database
from tollway import clock
from tollway.errors import CatalogError, TollwayError
from tollway.pricing.catalog import Catalog, parse_catalog
from tollway.store.catalog import apply_catalog
from tollway.store.db import Database

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "catalog.yaml"
BASE = yaml.safe_load(EXAMPLE.read_text())
SOURCE = "fuzz.yaml"
FAST_EXAMPLES = 60
LONG_EXAMPLES = int(os.environ.get("TOLLWAY_STRESS_EXAMPLES", "2000"))

#: YAML scalars and shapes that have broken loaders: sexagesimal and special floats, huge and
#: tiny numbers, octal and hex, dates (valid and not), tags, anchors, NUL, booleans.
TRICKY = ["1:30.5", "-1:30", ".inf", "-.nan", "1e400", "1e-400", "0x1F", "0o17", "0b101", "~",
          "[1, 2]", "{a: 1}", "2025-01-01", "2025-13-45", "2025-01-01T00:00:00+99:00",
          "!!binary aGk=", "!!set {a, b}", "1_000.000_1", '"\\0"', "yes", "-1", "0",
          "100000000000000000000000000000", "0.0000000001", "'0.15'", "&a [*a]", "[]", "{}",
          '"1e3"', "-0.0", "+.5", "1.", "!!float 3", "!!int '12'", "!!str 0.5",
          "!!timestamp 2001-12-14", "!!python/object:os.system ls"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=20), st.sampled_from(["0.15", "-1", "1e30", "NaN", "abc",
                                                           "/path/{x}", "GET", "sandbox"]))
structures = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=12), st.integers(), st.booleans()), inner,
                    max_size=4)), max_leaves=20)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[Database]:
    with fresh_database(request) as db:
        yield db


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path (keys and indexes) into a YAML tree."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from paths(value, (*prefix, index))


ALL_PATHS = [p for p in paths(BASE) if p]


@st.composite
def near_valid(draw: st.DrawFn) -> str:
    """The example catalog with one or a few mutations, as YAML text."""
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ALL_PATHS))
        parent: Any = data
        try:
            for step in path[:-1]:
                parent = parent[step]
            last = path[-1]
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                parent[last] = draw(structures)
            elif action == "delete":
                del parent[last]
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=10))] = draw(structures)
            else:
                parent.append(draw(structures))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    text = yaml.safe_dump(data, sort_keys=False)
    if draw(st.booleans()):  # one value replaced by a raw YAML snippet
        values = list(re.finditer(r"(?<=: )[^\s{}\[\],][^\n,}]*", text))
        if values:
            match = draw(st.sampled_from(values))
            text = text[:match.start()] + draw(st.sampled_from(TRICKY)) + text[match.end():]
    return text


def load(text: str) -> Catalog | None:
    """Parse; a refusal must be the documented error naming the file, item and field."""
    try:
        return parse_catalog(text, source=SOURCE)
    except CatalogError as exc:
        assert exc.problems, exc
        for problem in exc.problems:
            assert problem.startswith(f"{SOURCE}: "), problem
            where = problem[len(SOURCE) + 2:]
            # an item's problem names its section, item and field: models[id].price.input
            if where.startswith(("models[", "endpoints[")):
                assert re.match(r"^(models|endpoints)\[[^\]]*\](\.\S.*?)?: ", where), problem
        return None


def apply(db: Database, catalog: Catalog) -> None:
    try:
        with db.write() as conn:
            apply_catalog(conn, catalog, now_ms=clock.now_ms())
    except TollwayError:
        pass


def fuzz(strategy: st.SearchStrategy[Any], check: Callable[[Any], None], *,
         long: bool) -> None:
    """Run ``check`` on examples of ``strategy``: a few, derandomized (``make test``), or
    :data:`LONG_EXAMPLES` random ones (``make stress``)."""
    @settings(max_examples=LONG_EXAMPLES if long else FAST_EXAMPLES, derandomize=not long,
              deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(value=strategy)
    def run(value: Any) -> None:
        check(value)

    run()


def check_structure(data: Any) -> None:
    load(yaml.safe_dump(data))
    load(yaml.safe_dump({"providers": data, "groups": data, "models": [data],
                         "endpoints": data}))


def check_near_valid(database: Database) -> Callable[[str], None]:
    def check(text: str) -> None:
        catalog = load(text)
        if catalog is not None:
            apply(database, catalog)
    return check


@pytest.mark.parametrize("long", [False, pytest.param(True, marks=pytest.mark.stress)],
                         ids=["fast", "long"])
def test_random_text(long: bool) -> None:
    fuzz(st.text(max_size=300), load, long=long)


@pytest.mark.parametrize("long", [False, pytest.param(True, marks=pytest.mark.stress)],
                         ids=["fast", "long"])
def test_random_yaml_structures(long: bool) -> None:
    fuzz(structures, check_structure, long=long)


@pytest.mark.parametrize("long", [False, pytest.param(True, marks=pytest.mark.stress)],
                         ids=["fast", "long"])
def test_near_valid_catalogs_load_or_name_the_problem(database: Database, long: bool) -> None:
    fuzz(near_valid(), check_near_valid(database), long=long)


@pytest.mark.parametrize("snippet", TRICKY)
def test_every_tricky_scalar_in_every_value(snippet: str) -> None:
    """Deterministic sweep: each tricky scalar in place of each value of the example."""
    text = yaml.safe_dump(BASE, sort_keys=False)
    for match in re.finditer(r"(?<=: )[^\s{}\[\],][^\n,}]*", text):
        load(text[:match.start()] + snippet + text[match.end():])


def test_a_mix_of_key_types_is_a_catalog_error() -> None:
    """Regression: sorting unknown keys of mixed types (1 and "x") raised TypeError."""
    with pytest.raises(CatalogError) as caught:
        parse_catalog("1: a\nx: b\nmodels:\n  - {id: m, 1: x, y: z, price: {2: 1, w: 2}}\n",
                      source=SOURCE)
    assert all(p.startswith(f"{SOURCE}: ") for p in caught.value.problems)
