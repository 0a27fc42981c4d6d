"""The ``ohs`` command line: one entry point over every package's commands."""
