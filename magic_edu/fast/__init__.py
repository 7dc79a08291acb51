"""Exact speed shortcuts behind the fast decode loop (each tested against the plain path)."""
