"""Full context: the whole document and the question in one prompt, one prefill per question."""

from __future__ import annotations

from dataclasses import dataclass

from gistctl import prompt
from gistctl.errors import DataError
from gistctl.generation import greedy_generate
from gistctl.kv.sizes import kv_cache_bytes
from gistctl.methods.base import Answer, register
from gistctl.models import LoadedModel, peak_memory_bytes


@dataclass
class FullState:
    document: str
    document_tokens: int


@register("full")
@dataclass
class FullContext:
    """Exact but pays for the whole document at every question."""

    loaded: LoadedModel
    truncate: bool = False  # cut the document's end to fit the window instead of failing
    max_new_tokens: int = prompt.MAX_NEW_TOKENS
    name: str = "full"
    warnings: list[str] | None = None

    def prepare(self, document: str) -> FullState:
        if not document.strip():
            raise DataError("the document is empty")
        return FullState(document, len(prompt.context_ids(self.loaded.tokenizer, document)))

    def window(self) -> int:
        return int(getattr(self.loaded.model.config, "max_position_embeddings", 2048))

    def prompt_ids(self, state: FullState, question: str) -> list[int]:
        tokenizer = self.loaded.tokenizer
        ids = prompt.with_context_ids(tokenizer, state.document, question)
        budget = self.window() - self.max_new_tokens
        excess = len(ids) - budget
        if excess <= 0:
            return ids
        if not self.truncate:
            raise DataError(f"document + question take {len(ids)} tokens but the model's window allows {budget} "
                            f"(plus {self.max_new_tokens} to answer); use the gist or rag method, or --truncate")
        doc_ids = prompt.context_ids(tokenizer, state.document)[: max(0, state.document_tokens - excess)]
        self.warnings = (self.warnings or []) + [f"document truncated: {excess} of {state.document_tokens} tokens cut"]
        return prompt.with_context_ids(tokenizer, tokenizer.decode(doc_ids), question)

    def answer(self, state: FullState, question: str) -> Answer:
        ids = self.prompt_ids(state, question)
        gen = greedy_generate(self.loaded.model, self.loaded.tokenizer, ids, max_new_tokens=self.max_new_tokens,
                              stop_ids=prompt.stop_ids(self.loaded.model, self.loaded.tokenizer))
        return Answer(gen.text, gen.ttft_s * 1000, gen.decode_tokens_per_s, gen.prompt_tokens,
                      peak_memory_bytes(self.loaded.device))

    def state_bytes(self, state: FullState) -> int:
        """The KV cache this document occupies, at the model's dtype."""
        bytes_per_value = self.loaded.dtype.itemsize
        return kv_cache_bytes(self.loaded.model.config, state.document_tokens, bytes_per_value)
