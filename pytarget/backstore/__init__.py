"""Backing stores for logical units."""
