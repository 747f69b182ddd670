"""Ways to answer questions about a document (gist, rag, full) behind one protocol."""

from gistctl.methods.base import REGISTRY, Answer, Method, get_method, register

__all__ = ["REGISTRY", "Answer", "Method", "get_method", "register"]
