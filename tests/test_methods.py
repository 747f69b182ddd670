"""The three methods behind one protocol: same Answer fields, documented state bytes."""

import pytest

from gistctl.engine import open_gist_model
from gistctl.kv.sizes import kv_cache_bytes
from gistctl.methods import Answer, get_method
from gistctl.models import load_embedder, load_model

DOC = ("The harbour master keeps a ledger of every boat. " * 5 + "The radio call sign of the island is MRW-7. "
       + "Gulls circle the cliffs all day. " * 5)
QUESTION = "What is the radio call sign of the island?"


def _check_answer(answer):
    assert isinstance(answer, Answer)
    assert isinstance(answer.text, str)
    assert answer.ttft_ms > 0 and answer.prompt_tokens > 0 and answer.peak_memory_bytes > 0
    assert answer.decode_tokens_per_s >= 0


def _methods(model_spec, tmp_path, device="cpu"):
    loaded = load_model(model_spec, device=device)
    gm = open_gist_model(model_spec, "none", num_gist=4, chunk_tokens=64, device=device)
    return {
        "full": get_method("full", loaded=loaded, max_new_tokens=4),
        "rag": get_method("rag", loaded=loaded, embedder=load_embedder(), chunk_tokens=48, overlap=8, top_k=1,
                          index_dir=str(tmp_path / "index"), max_new_tokens=4),
        "gist": get_method("gist", gist_model=gm, blob_dir=str(tmp_path / "blobs"), max_new_tokens=4),
    }


def test_three_methods_answer_and_report_state_bytes(tiny_model_dir, tmp_path):
    methods = _methods(str(tiny_model_dir), tmp_path)
    states = {name: method.prepare(DOC) for name, method in methods.items()}
    for name, method in methods.items():
        _check_answer(method.answer(states[name], QUESTION))
    full_state, gist_state = states["full"], states["gist"]
    config = methods["full"].loaded.model.config
    assert methods["full"].state_bytes(full_state) == kv_cache_bytes(config, full_state.document_tokens, 4)
    assert methods["gist"].state_bytes(gist_state) == gist_state.path.stat().st_size
    rag_state = states["rag"]
    on_disk = sum(p.stat().st_size for p in rag_state.table_path.rglob("*") if p.is_file())
    text = sum(len(c.text.encode("utf-8")) for c in rag_state.chunks)
    assert methods["rag"].state_bytes(rag_state) == on_disk + text


def test_full_context_too_long_is_a_clear_error(tiny_model_dir):
    from gistctl.errors import DataError

    method = get_method("full", loaded=load_model(str(tiny_model_dir), device="cpu"))
    state = method.prepare("word " * 2000)  # the tiny model's window is 512
    with pytest.raises(DataError, match="window"):
        method.answer(state, QUESTION)
    method.truncate = True
    answer = method.answer(state, QUESTION)
    assert answer.prompt_tokens <= 512 and "truncated" in method.warnings[0]


def test_full_prompt_holds_the_whole_document(tiny_model_dir):
    method = get_method("full", loaded=load_model(str(tiny_model_dir), device="cpu"))
    state = method.prepare(DOC)
    text = method.loaded.tokenizer.decode(method.prompt_ids(state, QUESTION))
    assert DOC.strip() in text and QUESTION in text


@pytest.mark.slow
def test_three_methods_end_to_end_on_the_default_model(tmp_path):
    methods = _methods(None, tmp_path)
    answers = {}
    for name, method in methods.items():
        answers[name] = method.answer(method.prepare(DOC), QUESTION)
        _check_answer(answers[name])
    # what each method makes the model read at question time: the whole document, some chunks, the question
    assert answers["full"].prompt_tokens > answers["rag"].prompt_tokens > answers["gist"].prompt_tokens
