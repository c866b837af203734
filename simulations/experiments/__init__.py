"""Experiments that compare strategies on the demo data; each writes a table and a plot into docs/."""
