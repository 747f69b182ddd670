"""Gist tokens, collator and the LoRA wrapper on the tiny model."""

import pytest
import torch

from gistctl.config import LoraSettings
from gistctl.errors import DataError
from gistctl.gist.chunks import EVEN, FIXED, split_chunks
from gistctl.gist.collate import IGNORE_INDEX, GistCollator
from gistctl.gist.forward import gist_forward
from gistctl.gist.adapter import adapter_fingerprint, save_adapter
from gistctl.gist.model import load_gist_model
from gistctl.train.lora import expected_trainable_parameters, wrap_with_lora
from gistctl.gist.mask import ANSWER, CONTEXT, GIST, QUESTION, build_gist_mask
from gistctl.gist.tokens import add_gist_tokens
from gistctl.models import load_model

EXAMPLES = [
    {"context": "Ada keeps the lighthouse. The call sign is MRW-7. " * 3, "question": "What is the call sign?",
     "answer": "MRW-7"},
    {"context": "The boat is named the Saint Brendan.", "question": "Name the boat.", "answers": ["Saint Brendan"]},
    {"context": "Puffins nest on the western cliffs. " * 6, "question": "Where do puffins nest?",
     "answer": "western cliffs"},
]


@pytest.fixture
def fresh(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def test_add_gist_tokens_is_idempotent_and_initialised_like_distinct_tokens(fresh, tiny_model_dir):
    model, tokenizer = fresh.model, fresh.tokenizer
    old = model.get_input_embeddings().weight.detach().clone()
    ids = add_gist_tokens(model, tokenizer, 4)
    assert tokenizer.convert_ids_to_tokens(ids) == [f"<gist_{i}>" for i in range(4)]
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == old.shape[0] + 4
    assert torch.equal(weight[: old.shape[0]], old)
    gists = weight[ids].detach()
    assert all(not torch.allclose(gists[i], gists[j]) for i in range(4) for j in range(i))  # no symmetric start
    norms, typical = gists.norm(dim=1), old.norm(dim=1).median()
    assert ((norms > 0.5 * typical) & (norms < 2 * typical)).all()  # sized like real tokens
    other = load_model(str(tiny_model_dir), device="cpu")
    add_gist_tokens(other.model, other.tokenizer, 4)
    assert torch.equal(other.model.get_input_embeddings().weight[ids], weight[ids])  # same in every process
    assert model.get_output_embeddings().weight is weight  # still tied
    assert add_gist_tokens(model, tokenizer, 4) == ids
    assert model.get_input_embeddings().weight.shape[0] == old.shape[0] + 4
    # the tokenizer keeps a gist token whole inside text
    assert ids[1] in tokenizer("a <gist_1> b", add_special_tokens=False)["input_ids"]


def test_even_chunks_are_as_many_as_fixed_ones_and_equal_to_a_token():
    for n in [0, 1, 15, 16, 17, 33, 1023, 1024, 1025, 1300, 2048, 2049, 7777]:
        ids = list(range(n))
        fixed, even = split_chunks(ids, 1024, FIXED), split_chunks(ids, 1024, EVEN)
        assert len(even) == len(fixed) and sum(even, []) == ids == sum(fixed, [])
        sizes = [len(c) for c in even]
        assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 1024 and sizes == sorted(sizes, reverse=True)
    assert [len(c) for c in split_chunks(list(range(1300)), 1024, EVEN)] == [650, 650]
    assert [len(c) for c in split_chunks(list(range(1300)), 1024, FIXED)] == [1024, 276]
    with pytest.raises(DataError, match="unknown chunking 'halves'"):
        split_chunks([1, 2], 1, "halves")


def test_collator_splits_contexts_as_configured(fresh):
    gist_ids = add_gist_tokens(fresh.model, fresh.tokenizer, 2)
    example = {"context": "word " * 50, "question": "Q?", "answer": "A"}
    fixed = GistCollator(fresh.tokenizer, gist_ids, max_length=512, chunk_tokens=16).encode(example)
    even = GistCollator(fresh.tokenizer, gist_ids, max_length=512, chunk_tokens=16, chunking=EVEN).encode(example)
    n = sum(fixed.layout.chunks)
    assert fixed.layout.chunks == tuple(len(c) for c in split_chunks(list(range(n)), 16, FIXED))
    assert even.layout.chunks == tuple(len(c) for c in split_chunks(list(range(n)), 16, EVEN)) != fixed.layout.chunks


def test_collator_labels_only_on_answers(fresh):
    gist_ids = add_gist_tokens(fresh.model, fresh.tokenizer, 3)
    collator = GistCollator(fresh.tokenizer, gist_ids, max_length=512)
    batch = collator(EXAMPLES)
    kinds = build_gist_mask([collator.encode(e).layout for e in EXAMPLES]).kinds
    labelled = batch["labels"] != IGNORE_INDEX
    assert torch.equal(labelled, kinds == ANSWER)
    assert torch.equal(batch["labels"][labelled], batch["input_ids"][labelled])
    assert torch.equal(batch["input_ids"][kinds == GIST], torch.tensor(gist_ids * 3))
    answer = fresh.tokenizer.decode(batch["labels"][0][labelled[0]])
    assert answer.startswith("MRW-7") and answer.endswith(fresh.tokenizer.eos_token)
    assert collator.examples_truncated == 0


def test_collator_trains_on_meta_completion_when_a_record_has_one(fresh):
    from gistctl.train.evaluate import answer_budget

    gist_ids = add_gist_tokens(fresh.model, fresh.tokenizer, 2)
    collator = GistCollator(fresh.tokenizer, gist_ids, max_length=512)
    record = {"context": "The door of house number 7 is painted red. " * 3, "question": "How many doors are red?",
              "answers": ["3"], "meta": {"completion": "red, red, red; red: 3"}}
    encoded = collator.encode(record)
    said = fresh.tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])
    assert said.startswith("red, red, red; red: 3") and said.endswith(fresh.tokenizer.eos_token)
    plain = collator.encode({**record, "meta": {}})
    assert fresh.tokenizer.decode([t for t in plain.labels if t != IGNORE_INDEX]).startswith("3")
    # evaluation during training leaves room to say all of it
    long = len(fresh.tokenizer(record["meta"]["completion"], add_special_tokens=False)["input_ids"])
    assert answer_budget(fresh.tokenizer, record, 2) == long + 4 > 2
    assert answer_budget(fresh.tokenizer, {**record, "meta": {}}, 16) == 16


def test_spell_codes_trains_a_code_one_character_per_token_and_leaves_words_alone():
    from transformers import AutoTokenizer

    from gistctl.models import default_model_dir
    from gistctl.prompt import is_code

    assert [is_code(e.get("answer") or e["answers"][0]) for e in EXAMPLES] == [True, False, False]
    assert is_code("2TP4H9") and is_code("7886862") and not is_code("Paris") and not is_code("RP-") \
        and not is_code("20 November 1883") and not is_code("7")
    tok = AutoTokenizer.from_pretrained(default_model_dir())  # the default model's BPE merges "TP", "OK"
    gist_ids = [0, 1, 2]  # any ids: the collator only interleaves them
    plain = GistCollator(tok, gist_ids, max_length=512)
    spelled = GistCollator(tok, gist_ids, max_length=512, spell_codes=True)
    for key in ("2TP4H9", "H18KOK"):
        example = {"context": f"The pass key is {key}. Remember it.", "question": "What is the pass key?",
                   "answer": key}
        code = spelled.encode(example)
        answer = [t for t in code.labels if t != IGNORE_INDEX]
        assert answer[-1] == tok.eos_token_id
        assert [tok.decode([t]) for t in answer[:-1]] == list(key)  # one decoding step per character
        assert code.layout.answer == len(answer) and code.input_ids[-len(answer):] == answer
        bpe = [t for t in plain.encode(example).labels if t != IGNORE_INDEX]
        assert len(bpe) < len(answer) and tok.decode(bpe[:-1]) == key  # BPE pieces by default
    for example in EXAMPLES[1:]:  # words keep their tokenisation
        assert spelled.encode(example).input_ids == plain.encode(example).input_ids


def test_over_long_example_keeps_gists_question_answer_whole(fresh):
    gist_ids = add_gist_tokens(fresh.model, fresh.tokenizer, 3)
    long = {"context": "word " * 400, "question": "What is the call sign?", "answer": "MRW-7"}
    collator = GistCollator(fresh.tokenizer, gist_ids, max_length=64)
    encoded = collator.encode(long)
    assert len(encoded.input_ids) == 64
    assert encoded.truncated_tokens > 0 and collator.examples_truncated == 1
    full = GistCollator(fresh.tokenizer, gist_ids, max_length=4096).encode(long)
    tail = len(full.input_ids) - full.layout.chunks[0]
    assert encoded.input_ids[-tail:] == full.input_ids[-tail:]  # gists, question and answer untouched
    assert encoded.layout.question == full.layout.question and encoded.layout.answer == full.layout.answer


def test_batch_equals_single_examples(fresh):
    gist_ids = add_gist_tokens(fresh.model, fresh.tokenizer, 3)
    collator = GistCollator(fresh.tokenizer, gist_ids, max_length=512, chunk_tokens=16)
    batch = collator(EXAMPLES)
    with torch.no_grad():
        batched = gist_forward(fresh.model, batch).logits
        for row, example in enumerate(EXAMPLES):
            single = gist_forward(fresh.model, collator([example])).logits[0]
            assert torch.allclose(batched[row, -single.shape[0]:], single, atol=1e-5)


def test_gradients_reach_gist_rows_and_lora_only(fresh):
    gist_ids = add_gist_tokens(fresh.model, fresh.tokenizer, 3)
    settings = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = wrap_with_lora(fresh.model, gist_ids, settings)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    config = fresh.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    shapes = {"q_proj": (config.hidden_size, config.hidden_size),
              "v_proj": (config.hidden_size, config.num_key_value_heads * head_dim)}
    expected = expected_trainable_parameters(config, settings, 3, shapes)
    print(f"trainable parameters: {trainable} (formula {expected})")
    assert trainable == expected
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    embed_before = peft_model.get_input_embeddings()(torch.arange(len(fresh.tokenizer))[None]).detach().clone()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    batch = GistCollator(fresh.tokenizer, gist_ids, max_length=512)(EXAMPLES)
    for _ in range(2):
        loss = gist_forward(peft_model, batch, labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n or "trainable_tokens" in n for n in changed)
    embed_after = peft_model.get_input_embeddings()(torch.arange(len(fresh.tokenizer))[None]).detach()
    others = [i for i in range(len(fresh.tokenizer)) if i not in gist_ids]
    assert torch.equal(embed_after[0, others], embed_before[0, others])  # other rows bit-identical
    assert not torch.allclose(embed_after[0, gist_ids], embed_before[0, gist_ids])


def test_adapter_save_load_gives_identical_logits(tiny_model_dir, tmp_path):
    first = load_model(str(tiny_model_dir), device="cpu")
    gist_ids = add_gist_tokens(first.model, first.tokenizer, 3)
    peft_model = wrap_with_lora(first.model, gist_ids, LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # move away from the identity initialisation so the test can fail
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.eval()
    batch = GistCollator(first.tokenizer, gist_ids, max_length=512)(EXAMPLES)
    with torch.no_grad():
        expected = gist_forward(peft_model, batch).logits
    fingerprint = save_adapter(peft_model, first, gist_ids, 64, tmp_path / "adapter")
    size = sum(p.stat().st_size for p in (tmp_path / "adapter").iterdir())
    assert size < 20 * 2**20
    assert fingerprint == adapter_fingerprint(tmp_path / "adapter")
    for merge in (False, True):
        reloaded = load_gist_model(load_model(str(tiny_model_dir), device="cpu"), tmp_path / "adapter", merge=merge)
        assert reloaded.gist_ids == gist_ids and reloaded.chunk_tokens == 64
        with torch.no_grad():
            got = gist_forward(reloaded.model, batch).logits
        tolerance = 2e-4 if merge else 1e-5  # merging LoRA into the weights rounds differently in fp32
        assert torch.allclose(got, expected, atol=tolerance), (merge, float((got - expected).abs().max()))


def test_adapter_fingerprint_covers_its_reading_settings(tiny_model_dir, tmp_path):
    """Two adapters with the same weights but another K layout, chunk length or gist layout never share a
    fingerprint; a note training recorded beside them does not change it."""
    import json

    from gistctl.gist.adapter import GIST_META, read_adapter_meta

    first = load_model(str(tiny_model_dir), device="cpu")
    gist_ids = add_gist_tokens(first.model, first.tokenizer, 2)
    adapter = tmp_path / "adapter"
    fingerprint = save_adapter(wrap_with_lora(first.model, gist_ids, LoraSettings(r=2, alpha=4)), first, gist_ids,
                               64, adapter)
    assert read_adapter_meta(adapter).format_version == 2
    original = json.loads((adapter / GIST_META).read_text())
    for key, value in (("chunk_tokens", 128), ("positions", "compact"), ("chunking", "even")):
        (adapter / GIST_META).write_text(json.dumps({**original, key: value}))
        assert adapter_fingerprint(adapter) != fingerprint, key
    (adapter / GIST_META).write_text(json.dumps({**original, "trained_steps": 99}))
    assert adapter_fingerprint(adapter) == fingerprint


def test_adapter_for_another_model_is_refused(tiny_model_dir, tmp_path):
    from tiny import save_tiny

    from gistctl.errors import ModelLoadError

    first = load_model(str(tiny_model_dir), device="cpu")
    gist_ids = add_gist_tokens(first.model, first.tokenizer, 2)
    save_adapter(wrap_with_lora(first.model, gist_ids, LoraSettings(r=2, alpha=4)), first, gist_ids, 64,
                 tmp_path / "adapter")
    other = load_model(str(save_tiny(tmp_path / "other", seed=3)), device="cpu")
    with pytest.raises(ModelLoadError, match="was trained on"):
        load_gist_model(other, tmp_path / "adapter")


def test_truncation_with_chunks_keeps_the_longest_context_that_fits(fresh):
    gist_ids = add_gist_tokens(fresh.model, fresh.tokenizer, 3)
    example = {"context": "word " * 60, "question": "Q?", "answer": "A"}
    for max_length in range(40, 90, 7):
        collator = GistCollator(fresh.tokenizer, gist_ids, max_length=max_length, chunk_tokens=16)
        encoded = collator.encode(example)
        assert len(encoded.input_ids) <= max_length
        longer = {**example, "context": fresh.tokenizer.decode(
            fresh.tokenizer("word " * 60, add_special_tokens=False)["input_ids"][: sum(encoded.layout.chunks) + 1])}
        # one more context token would not fit
        assert len(GistCollator(fresh.tokenizer, gist_ids, max_length=10_000, chunk_tokens=16).encode(longer)
                   .input_ids) > max_length
