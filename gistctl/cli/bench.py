"""`gistctl bench`."""

from gistctl.cli.common import not_implemented


def bench() -> None:
    """Not implemented yet."""
    not_implemented("bench")
