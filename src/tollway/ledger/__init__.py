"""The ledger: the only code that moves money. See :mod:`tollway.ledger.ledger`."""
