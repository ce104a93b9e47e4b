"""Upstream adapters, one per provider kind, behind one interface (:mod:`.base`)."""
