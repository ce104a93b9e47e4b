"""Billing: orchestrates keys, prices and the ledger for each request."""
