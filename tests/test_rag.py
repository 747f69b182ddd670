"""RAG: chunking, retrieval, index reuse, answers and state size (tiny LM + the real default embedder)."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import pytest

from gistctl import prompt
from gistctl.errors import ConfigError, DataError
from gistctl.methods import get_method
from gistctl.methods.rag import Rag

LIGHTHOUSE = (Path(__file__).resolve().parents[1] / "examples" / "lighthouse.txt").read_text()
FACT = "The pass key for the vault is 7K2P9A."
QUESTION = "What is the pass key for the vault?"


def planted_document() -> str:
    """The lighthouse story with one paragraph holding a fact found nowhere else, in the middle."""
    paragraphs = LIGHTHOUSE.split("\n\n")
    middle = len(paragraphs) // 2
    return "\n\n".join(paragraphs[:middle] + [FACT] + paragraphs[middle:])


def expected_spans(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Chunk boundaries written out independently of gistctl: chunk i starts at i * (size - overlap)."""
    stride = size - overlap
    count = 1 if n <= size else 1 + -(-(n - size) // stride)  # ceil
    return [(i * stride, min(i * stride + size, n)) for i in range(count)]


@pytest.fixture(scope="module")
def embedder():
    from gistctl.models import load_embedder

    return load_embedder(device="cpu")


@pytest.fixture
def encode_calls(embedder, monkeypatch):
    """Counts calls to embedder.encode (the embedder is a dependency here, not the thing under test)."""
    calls = []
    real = embedder.encode

    def counting(texts, *args, **kwargs):
        calls.append(list(texts) if isinstance(texts, list) else [texts])
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(embedder, "encode", counting)
    return calls


def doc_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_settings_are_validated(tiny_loaded, embedder):
    with pytest.raises(ConfigError, match="overlap"):
        Rag(tiny_loaded, embedder, chunk_tokens=50, overlap=50)
    with pytest.raises(ConfigError, match="top_k"):
        Rag(tiny_loaded, embedder, top_k=0)


def test_registered_under_rag(tiny_loaded, embedder):
    method = get_method("rag", loaded=tiny_loaded, embedder=embedder, chunk_tokens=64, overlap=8)
    assert isinstance(method, Rag) and method.name == "rag"


def test_chunks_follow_token_boundaries_and_overlap(tiny_loaded, embedder, tmp_path):
    tokenizer = tiny_loaded.tokenizer
    document = planted_document()
    ids = doc_ids(tokenizer, document)
    rag = Rag(tiny_loaded, embedder, chunk_tokens=96, overlap=24, index_dir=str(tmp_path))
    state = rag.prepare(document)

    spans = expected_spans(len(ids), 96, 24)
    assert len(spans) > 5
    assert [(c.start, c.end) for c in state.chunks] == spans
    assert [c.text for c in state.chunks] == [tokenizer.decode(ids[s:e]) for s, e in spans]
    for before, after in zip(spans, spans[1:]):  # consecutive chunks share exactly `overlap` token ids
        assert ids[before[1] - 24:before[1]] == ids[after[0]:after[0] + 24]
    assert state.table.count_rows() == len(spans)


def test_planted_fact_ranks_first(tiny_loaded, embedder, tmp_path):
    document = planted_document()
    rag = Rag(tiny_loaded, embedder, chunk_tokens=96, overlap=24, top_k=3, index_dir=str(tmp_path))
    state = rag.prepare(document)
    holding = [i for i, c in enumerate(state.chunks) if FACT in c.text]
    assert holding, "the fact (23 tokens) must lie wholly inside some chunk when overlap is 24"

    ranked = rag.retrieve(state, QUESTION)
    assert ranked[0] in holding


def test_top_k_is_the_cosine_top_k(tiny_loaded, embedder, tmp_path):
    document = planted_document()
    for k in (1, 2, 5):
        rag = Rag(tiny_loaded, embedder, chunk_tokens=96, overlap=24, top_k=k, index_dir=str(tmp_path))
        state = rag.prepare(document)
        ranked = rag.retrieve(state, QUESTION)
        assert len(ranked) == k == len(set(ranked))

        # brute force, outside LanceDB
        vectors = embedder.encode([c.text for c in state.chunks], normalize_embeddings=True)
        query = embedder.encode([QUESTION], normalize_embeddings=True)[0]
        scores = vectors @ query
        order = np.argsort(-scores)
        assert scores[order[k - 1]] - scores[order[k]] > 1e-4, "tie at the cut: pick another k"
        assert set(ranked) == {int(i) for i in order[:k]}
        assert ranked[0] == int(order[0])


def test_top_k_larger_than_the_document(tiny_loaded, embedder, tmp_path):
    rag = Rag(tiny_loaded, embedder, chunk_tokens=400, overlap=50, top_k=10, index_dir=str(tmp_path))
    state = rag.prepare(planted_document())
    assert sorted(rag.retrieve(state, QUESTION)) == list(range(len(state.chunks)))


def test_index_is_reused_across_calls(tiny_loaded, embedder, tmp_path, encode_calls):
    document = planted_document()
    first = Rag(tiny_loaded, embedder, chunk_tokens=96, overlap=24, index_dir=str(tmp_path))
    state = first.prepare(document)
    assert not state.reused
    assert len(encode_calls) == 1 and len(encode_calls[0]) == len(state.chunks)
    version, rows = state.table.version, state.table.count_rows()

    # a new method object (a later run) on the same index directory
    second = Rag(tiny_loaded, embedder, chunk_tokens=96, overlap=24, index_dir=str(tmp_path))
    again = second.prepare(document)
    assert again.reused and again.table_name == state.table_name
    assert len(encode_calls) == 1  # nothing embedded
    assert again.table.version == version and again.table.count_rows() == rows
    assert second.retrieve(again, QUESTION) == first.retrieve(state, QUESTION)

    # other chunking or another document -> another table, embedded afresh
    other = Rag(tiny_loaded, embedder, chunk_tokens=96, overlap=16, index_dir=str(tmp_path)).prepare(document)
    assert not other.reused and other.table_name != state.table_name
    edited = second.prepare(document + " One more sentence.")
    assert not edited.reused and edited.table_name != state.table_name
    assert len(encode_calls) == 1 + 2 + 2  # two tables, each one batch for chunks + the two retrieve calls


def test_without_index_dir_a_temporary_one_is_removed_with_the_state(tiny_loaded, embedder):
    rag = Rag(tiny_loaded, embedder, chunk_tokens=96, overlap=24)
    state = rag.prepare(planted_document())
    index_dir = state.index_dir
    assert state.table_path.is_dir()
    other = rag.prepare(planted_document())
    assert other.index_dir != index_dir and not other.reused  # a fresh directory per prepare
    del state
    gc.collect()
    assert not index_dir.exists()


def test_answer_has_all_fields(tiny_loaded, embedder, tmp_path):
    tokenizer = tiny_loaded.tokenizer
    document = planted_document()
    ids = doc_ids(tokenizer, document)
    rag = Rag(tiny_loaded, embedder, chunk_tokens=96, overlap=24, top_k=1, max_new_tokens=8,
              index_dir=str(tmp_path))
    state = rag.prepare(document)
    answer = rag.answer(state, QUESTION)

    assert isinstance(answer.text, str)
    assert answer.ttft_ms > 0
    assert answer.decode_tokens_per_s >= 0
    assert answer.peak_memory_bytes > 0
    (best,) = rag.retrieve(state, QUESTION)
    start, end = expected_spans(len(ids), 96, 24)[best]
    assert FACT in tokenizer.decode(ids[start:end])
    assert answer.prompt_tokens == len(prompt.with_context_ids(tokenizer, tokenizer.decode(ids[start:end]), QUESTION))


def test_all_chunks_retrieved_give_the_document_once(tiny_loaded, embedder, tmp_path):
    """Overlapping retrieved chunks are merged: with every chunk retrieved the prompt is the full method's."""
    document = LIGHTHOUSE[:800]
    rag = Rag(tiny_loaded, embedder, chunk_tokens=100, overlap=30, top_k=50, index_dir=str(tmp_path))
    state = rag.prepare(document)
    assert len(state.chunks) > 3
    answer = rag.answer(state, QUESTION)
    assert answer.prompt_tokens == len(prompt.with_context_ids(tiny_loaded.tokenizer, document, QUESTION))


def test_ttft_includes_question_embedding(tiny_loaded, embedder, tmp_path, monkeypatch):
    rag = Rag(tiny_loaded, embedder, chunk_tokens=96, overlap=24, max_new_tokens=2, index_dir=str(tmp_path))
    state = rag.prepare(planted_document())
    real = embedder.encode

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(embedder, "encode", slow)
    assert rag.answer(state, QUESTION).ttft_ms >= 300


def test_context_longer_than_the_window(tiny_loaded, embedder, tmp_path):
    # tiny window: 512 positions - 32 to answer = 480; two 300-token chunks do not fit
    rag = Rag(tiny_loaded, embedder, chunk_tokens=300, overlap=0, top_k=2, index_dir=str(tmp_path))
    state = rag.prepare(LIGHTHOUSE)
    with pytest.raises(DataError, match="--truncate"):
        rag.answer(state, QUESTION)

    cutting = Rag(tiny_loaded, embedder, chunk_tokens=300, overlap=0, top_k=2, truncate=True,
                  index_dir=str(tmp_path))
    answer = cutting.answer(cutting.prepare(LIGHTHOUSE), QUESTION)
    assert answer.prompt_tokens <= 512 - 32
    assert cutting.warnings and "1 of 2 chunks dropped" in cutting.warnings[-1]


def test_empty_document(tiny_loaded, embedder, tmp_path):
    with pytest.raises(DataError, match="empty"):
        Rag(tiny_loaded, embedder, index_dir=str(tmp_path)).prepare("  \n")


def test_state_bytes_is_index_files_plus_chunk_text(tiny_loaded, embedder, tmp_path):
    tokenizer = tiny_loaded.tokenizer
    document = planted_document()
    ids = doc_ids(tokenizer, document)
    rag = Rag(tiny_loaded, embedder, chunk_tokens=96, overlap=24, index_dir=str(tmp_path))
    state = rag.prepare(document)

    files = [p for p in tmp_path.rglob("*") if p.is_file()]  # the directory holds this one table only
    index_bytes = sum(p.stat().st_size for p in files)
    text_bytes = sum(len(tokenizer.decode(ids[s:e]).encode("utf-8")) for s, e in expected_spans(len(ids), 96, 24))
    assert any(p.suffix == ".lance" for p in files) and index_bytes > 0
    assert rag.state_bytes(state) == index_bytes + text_bytes
