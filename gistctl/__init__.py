"""gistctl: learned context compression with gist tokens."""

__version__ = "0.1.0"
