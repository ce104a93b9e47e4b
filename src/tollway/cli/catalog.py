"""``tollway catalog …``: load and show the catalog."""

from __future__ import annotations

import argparse

from tollway import clock
from tollway.billing.marketplace import item_unit
from tollway.billing.views import (
    iso,
)
from tollway.cli.common import Commands, Output, open_db
from tollway.pricing.catalog import load_catalog
from tollway.pricing.display import price_lines
from tollway.store.catalog import apply_catalog, current_items


def cmd_catalog_apply(args: argparse.Namespace) -> Output:
    catalog = load_catalog(args.file)
    db = open_db(args)
    with db.write() as conn:
        report = apply_catalog(conn, catalog, now_ms=clock.now_ms())
    lines = [(f"applied {args.file}: {len(catalog.models)} models, "
              f"{len(catalog.endpoints)} endpoints, {len(catalog.groups)} groups")]
    lines += [f"  new price version: {item} (effective {iso(ms)})"
              for item, ms in report.new_versions]
    if report.unchanged:
        lines.append(f"  unchanged: {', '.join(report.unchanged)}")
    if report.deactivated:
        lines.append(f"  no longer listed: {', '.join(report.deactivated)}")
    data = {"new_versions": [{"item": i, "effective_from": iso(ms)}
                             for i, ms in report.new_versions],
            "unchanged": report.unchanged, "deactivated": report.deactivated,
            "groups": report.groups}
    return Output(data, "\n".join(lines))


def cmd_catalog_show(args: argparse.Namespace) -> Output:
    from tollway.billing.marketplace import listing

    db = open_db(args)
    with db.read() as conn:
        data = listing(conn, now_ms=clock.now_ms())
        items = current_items(conn, now_ms=clock.now_ms())
    lines = ["groups: " + ", ".join(f"{g} ×{r}" for g, r in data["groups"].items())]
    width = max((len(i.id) for i in items), default=10)
    for item in items:
        where = (f" {item.spec.method} /apis/v1{item.spec.path}"
                 if item.spec.is_endpoint else "")
        lines.append(f"{item.id:<{width}}  {item.billing_type:<8}  {item.provider}{where}")
        lines += [f"{'':<{width}}    {line}"
                  for line in price_lines(item.version.price, per=item_unit(item))]
        if item.version.group_ratios:
            lines.append(f"{'':<{width}}    group overrides: " + ", ".join(
                f"{g} ×{r}" for g, r in sorted(item.version.group_ratios.items())))
    if not items:
        lines.append("the catalog is empty: run `tollway catalog apply FILE`")
    return Output(data, "\n".join(lines))



def register(c: Commands) -> None:
    cat = c.group("catalog", "models, data APIs and prices")
    p = c.add(cat, "apply", cmd_catalog_apply, "load a catalog file; changed prices become new "
              "price versions")
    p.add_argument("file", metavar="FILE")
    c.add(cat, "show", cmd_catalog_show, "print the catalog with billing types and prices")
