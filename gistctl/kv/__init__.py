"""Gist KV blobs: the format on disk, compressing a document, answering from a blob."""
