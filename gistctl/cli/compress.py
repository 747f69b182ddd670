"""`gistctl compress`."""

from gistctl.cli.common import not_implemented


def compress() -> None:
    """Not implemented yet."""
    not_implemented("compress")
