"""Receipts of paid card top-ups: who may see one, the seller printed on it, and its PDF.

A receipt exists only for a *paid* order of the asking account: another account's order, an
unpaid one and a missing one are the same 404, so order ids reveal nothing. The HTML receipt
(the console's printable page) and the PDF say the same things from the same
:func:`receipt_data`. The PDF is drawn with fpdf2 (pure Python, no system libraries) in its
built-in Helvetica, whose alphabet is Latin-1: other characters in a name or address print
as ``?`` rather than failing the receipt.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from tollway import settings
from tollway.billing.payments import order_view
from tollway.errors import NotFound
from tollway.store import accounts as account_store
from tollway.store import payments as store


def business() -> tuple[str, list[str]]:
    """The seller's name and address lines (settings ``receipt_business_*``)."""
    address = settings.get("receipt_business_address").replace("\\n", "\n")
    return (settings.get("receipt_business_name"),
            [line.strip() for line in address.splitlines() if line.strip()])


def receipt_data(conn: Connection, account_id: int, order_id: int) -> dict[str, Any]:
    """The order (as the API shows it) and the account of a receipt; NotFound unless the
    order is the account's and paid."""
    row = store.get(conn, order_id)
    if row is None or row.account_id != account_id or row.status != "paid":
        raise NotFound("no receipt for this payment")
    return {"order": order_view(row), "account": account_store.get_account(conn, account_id)}


def cents(view_usd: str) -> str:
    """A 9-decimal amount as dollars and cents (orders are whole cents, so exactly)."""
    whole, _, frac = view_usd.partition(".")
    return f"{whole}.{frac[:2]}"


def pdf_headers(data: dict[str, Any]) -> dict[str, str]:
    return {"content-disposition":
            f'inline; filename="receipt-TW-{data["order"]["id"]}.pdf"'}


def _text(value: object) -> str:
    return str(value).encode("latin-1", "replace").decode("latin-1")


def pdf(data: dict[str, Any]) -> bytes:
    """The receipt of :func:`receipt_data` as a one-page A4 PDF."""
    order, account = data["order"], data["account"]
    name, address = business()
    currency = order["currency"].upper()
    amount = cents(order["amount_usd"])
    from fpdf import FPDF  # noqa: PLC0415 - ~20 MiB per worker, loaded on the first receipt

    doc = FPDF(format="A4")
    doc.set_title(_text(f"Receipt TW-{order['id']} - {name}"))
    doc.set_author(_text(name))
    doc.set_creator("Tollway")
    doc.add_page()
    doc.set_font("Helvetica", "B", 20)
    doc.cell(0, 12, "Receipt", new_x="LMARGIN", new_y="NEXT")
    doc.set_font("Helvetica", "", 11)
    doc.cell(0, 6, _text(f"No. TW-{order['id']}"), new_x="LMARGIN", new_y="NEXT")
    doc.ln(4)
    doc.set_font("Helvetica", "B", 11)
    doc.cell(0, 6, _text(name), new_x="LMARGIN", new_y="NEXT")
    doc.set_font("Helvetica", "", 10)
    for line in address:
        doc.cell(0, 5, _text(line), new_x="LMARGIN", new_y="NEXT")
    doc.ln(6)
    billed = f"Billed to: {account.name}" + (f" ({account.email})" if account.email else "")
    doc.cell(0, 6, _text(f"{billed}, account {account.id}"), new_x="LMARGIN", new_y="NEXT")
    doc.cell(0, 6, _text(f"Paid: {order['paid_at']} by card through Stripe"),
             new_x="LMARGIN", new_y="NEXT")
    doc.cell(0, 6, _text(f"Order {order['id']}, Checkout Session {order['session_id']}"),
             new_x="LMARGIN", new_y="NEXT")
    doc.ln(6)
    doc.set_font("Helvetica", "B", 10)
    doc.cell(130, 8, "Description", border="B")
    doc.cell(0, 8, f"Amount ({currency})", border="B", align="R", new_x="LMARGIN",
             new_y="NEXT")
    doc.set_font("Helvetica", "", 10)
    doc.cell(130, 8, "Tollway prepaid credit")
    doc.cell(0, 8, amount, align="R", new_x="LMARGIN", new_y="NEXT")
    doc.set_font("Helvetica", "B", 10)
    doc.cell(130, 8, "Total paid", border="T")
    doc.cell(0, 8, f"{amount} {currency}", border="T", align="R", new_x="LMARGIN",
             new_y="NEXT")
    if order["reversed_usd"] != "0.000000000":
        doc.set_font("Helvetica", "", 10)
        doc.ln(4)
        doc.cell(0, 6, f"Refunded or disputed since: {cents(order['reversed_usd'])} {currency}",
                 new_x="LMARGIN", new_y="NEXT")
    return bytes(doc.output())
