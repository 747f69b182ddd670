"""`gistctl train`."""

from gistctl.cli.common import not_implemented


def train() -> None:
    """Not implemented yet."""
    not_implemented("train")
