"""Shared training utilities: typed configs and the pieces every task reuses."""
