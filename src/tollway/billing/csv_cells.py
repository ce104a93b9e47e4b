"""CSV cells a spreadsheet cannot run (OWASP "CSV injection").

A cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is read as a
formula by Excel, LibreOffice and Google Sheets (``=HYPERLINK(…)`` in a key name becomes a
link that leaks data when clicked). OWASP's rule: prefix such a cell with a single quote, so
it is shown as text. A plain decimal number (``-1.500000000``, an adjustment) is left as it
is: spreadsheets read it as a number, never as a formula, and the statement must add up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def cell(value: Any) -> Any:
    """``value`` as it may be written to a CSV cell."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(
            value):
        return "'" + value
    return value


def row(values: Iterable[Any]) -> list[Any]:
    return [cell(v) for v in values]
