"""Experiments and demos built on the library (outside the maths core)."""
