"""Prices: the catalog, price versions, group ratios and rating. Pure code, no I/O but reading
the catalog file."""
