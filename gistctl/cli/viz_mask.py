"""`gistctl viz-mask`."""

from gistctl.cli.common import not_implemented


def viz_mask() -> None:
    """Not implemented yet."""
    not_implemented("viz-mask")
