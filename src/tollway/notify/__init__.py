"""Notifications: signed webhooks and optional email, delivered from the outbox."""
