"""Benchmarks (``ohs bench ...``) of every stage and of the whole pipeline."""
