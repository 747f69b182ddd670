"""Errors a user can cause. The CLI prints them in one line and exits with code 2."""


class GistctlError(Exception):
    """A problem with the user's input or environment, with what to do about it."""


class ConfigError(GistctlError, ValueError):
    """A bad configuration key or value."""


class ModelLoadError(GistctlError):
    """The model, tokenizer or embedder could not be loaded as asked."""


class BlobError(GistctlError):
    """A gist KV blob is unreadable, corrupt, or does not match the loaded model."""


class DataError(GistctlError, ValueError):
    """A dataset or document that cannot be used as given."""


class RunLockedError(GistctlError):
    """A run directory is in use by another gistctl process."""
