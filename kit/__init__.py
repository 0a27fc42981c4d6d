"""Neutral helpers every process shares (logging, build version, the CQL cluster factory, retries).

Imports no other package of the project: every stage may import it.
"""
