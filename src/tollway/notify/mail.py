"""Notification email over SMTP (standard library; run in a thread by the deliverer)."""

from __future__ import annotations

import json
import smtplib
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

SMTPError = smtplib.SMTPException

_SUBJECTS = {"balance.low": "Your Tollway balance is low",
             "balance.topup": "Your Tollway balance was topped up",
             "payment.reversed": "A card payment to Tollway was refunded or disputed"}


def message(sender: str, to: str, event_type: str, body: str) -> EmailMessage:
    """A plain-text email that says what happened, with the event document attached as
    text (the same JSON a webhook receives)."""
    event = json.loads(body)
    data = event["data"]
    if event_type == "balance.low":
        text = (f"The available balance of account {event['account_id']} is "
                f"{data['available_usd']} USD, below your alert threshold of "
                f"{data['threshold_usd']} USD.")
    elif event_type == "payment.reversed":
        text = (f"Order {data['order_id']} ({data['reason']}): {data['amount_usd']} USD was "
                f"taken back; {data['taken_usd']} USD from account {event['account_id']}, "
                f"{data['written_off_usd']} USD written off. {data['available_usd']} USD is "
                "now available.")
    else:
        text = (f"{data['amount_usd']} USD was added to account {event['account_id']}; "
                f"{data['available_usd']} USD is now available.")
    msg = EmailMessage()
    msg["From"], msg["To"] = sender, to
    msg["Subject"] = _SUBJECTS.get(event_type, f"Tollway: {event_type}")
    msg.set_content(f"{text}\n\nEvent {event['id']} at {event['created_at']}:\n{body}\n")
    return msg


def send(smtp_url: str, sender: str, to: str, event_type: str, body: str, *,
         timeout_s: float) -> None:
    """``smtp://user:pass@host:port`` (STARTTLS when the server offers it) or ``smtps://``."""
    url = urlsplit(smtp_url)
    if url.scheme not in ("smtp", "smtps") or not url.hostname:
        raise SMTPError(f"smtp_url must be smtp:// or smtps://, got {url.scheme or '?'}://")
    client_type = smtplib.SMTP_SSL if url.scheme == "smtps" else smtplib.SMTP
    port = url.port or (465 if url.scheme == "smtps" else 25)
    with client_type(url.hostname, port, timeout=timeout_s) as client:
        if url.scheme == "smtp":
            client.ehlo()
            if client.has_extn("starttls"):
                client.starttls()
                client.ehlo()
        if url.username:
            client.login(unquote(url.username), unquote(url.password or ""))
        client.send_message(message(sender, to, event_type, body))
