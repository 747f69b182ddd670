"""The gist mask, cell by cell, and its effect on a real (tiny) model."""

import pytest
import torch

from gistctl.gist.mask import (ANSWER, CONTEXT, GIST, PAD, QUESTION, GistLayout, build_gist_mask, prefix_mask,
                               to_additive, to_sdpa)


def _cells(layout_list):
    batch = build_gist_mask(layout_list)
    return batch, batch.kinds, batch.attend


@pytest.mark.parametrize("k", [1, 10, 25])
def test_single_chunk_rules_batch_of_three(k):
    layouts = [GistLayout((7,), k, 4, 3), GistLayout((2,), k, 5, 1), GistLayout((12,), k, 3, 2)]
    batch, kinds, attend = _cells(layouts)
    length = kinds.shape[1]
    for row, layout in enumerate(layouts):
        pad = length - layout.length
        kind = kinds[row]
        assert (kind[:pad] == PAD).all() and (kind[pad:] != PAD).all()
        for q in range(length):
            for key in range(length):
                allowed = bool(attend[row, q, key])
                if kind[q] == PAD or kind[key] == PAD or key > q:
                    assert not allowed
                elif kind[q] in (QUESTION, ANSWER):
                    assert allowed == (kind[key] != CONTEXT)  # gists and earlier q/a, never context
                else:  # context and gists see earlier context and gists
                    assert allowed
        positions = batch.position_ids[row, pad:]
        assert torch.equal(positions, torch.arange(layout.length))


def test_multi_chunk_rules():
    layout = GistLayout((3, 4, 2), 2, 3, 2)
    batch, kinds, attend = _cells([layout])
    blocks = batch.blocks[0]
    kind = kinds[0]
    for q in range(layout.length):
        for key in range(layout.length):
            allowed = bool(attend[0, q, key])
            if key > q:
                assert not allowed
            elif kind[q] in (QUESTION, ANSWER):
                assert allowed == (kind[key] in (GIST, QUESTION, ANSWER))
            elif blocks[key] == blocks[q]:
                assert allowed  # own chunk, own gists (causal)
            else:
                assert allowed == (kind[key] == GIST)  # only earlier chunks' gists, never their text
    assert layout.gist_positions().tolist() == [3, 4, 9, 10, 13, 14]


def test_converters_share_one_source_and_never_nan():
    batch = build_gist_mask([GistLayout((3,), 2, 2, 1), GistLayout((1,), 2, 1, 1)])
    additive = to_additive(batch.attend, torch.float32)
    sdpa = to_sdpa(batch.attend)
    assert additive.shape == sdpa.shape == (2, 1) + batch.attend.shape[1:]
    real = batch.kinds != PAD
    real_rows = real[:, None, :, None].expand_as(sdpa)
    # on real query rows both converters say exactly what the boolean source says
    assert torch.equal(sdpa[real_rows], batch.attend[:, None][real_rows])
    assert torch.equal((additive == 0)[real_rows], batch.attend[:, None][real_rows])
    assert (additive[~(additive == 0)] == torch.finfo(torch.float32).min).all()
    # padding rows have something to attend (themselves) so softmax stays finite
    assert sdpa.any(dim=-1).all()


def test_prefix_mask():
    mask = prefix_mask(3, 2)[0]
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def _tiny(attn):
    from tiny import build_model

    return build_model(vocab_size=300, seed=0, attn_implementation=attn).double()  # float64: equal means equal


def _hidden_states(model, ids, batch):
    from gistctl.gist.forward import gist_forward

    with torch.no_grad():
        return gist_forward(model, {**batch, "input_ids": ids}, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_influence_context_changes_reach_question_only_through_gists(attn):
    model = _tiny(attn)
    layout = GistLayout((10,), 3, 5, 2)
    batch = build_gist_mask([layout]).__dict__
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (1, layout.length))
    changed = ids.clone()
    changed[0, :10] = torch.randint(3, 300, (10,))  # new context, same gists/question/answer
    after = slice(13, layout.length)  # question + answer
    base = _hidden_states(model, ids, batch)
    other = _hidden_states(model, changed, batch)
    # embeddings and layer 0: question tokens see gist *inputs* only, so the context cannot reach them
    assert torch.equal(base[0][0, after], other[0][0, after])
    assert torch.allclose(base[1][0, after], other[1][0, after], atol=1e-6)
    # the gists do see the context
    assert not torch.allclose(base[1][0, 10:13], other[1][0, 10:13], atol=1e-4)
    # without the gist mask (plain causal) the context leaks into the question at layer 0
    with torch.no_grad():
        plain_a = model(ids, output_hidden_states=True).hidden_states[1]
        plain_b = model(changed, output_hidden_states=True).hidden_states[1]
    assert not torch.allclose(plain_a[0, after], plain_b[0, after], atol=1e-4)


def _question_states_from_gist_cache(model, ids, layout):
    """Hidden states of question+answer computed from a cache that holds the gists' KV and nothing else."""
    from transformers import DynamicCache

    from gistctl.gist.mask import mask_for_model

    prefix = layout.prefix_length
    gists = layout.gist_positions()
    prefix_batch = build_gist_mask([GistLayout(layout.chunks, layout.num_gist)])
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefix], position_ids=prefix_batch.position_ids,
                    attention_mask=mask_for_model(prefix_batch.attend, model), use_cache=True)
        cache = DynamicCache(ddp_cache_data=[(layer.keys[:, :, gists], layer.values[:, :, gists])
                                             for layer in out.cache.layers], config=model.config)
        rest = layout.length - prefix
        return model(input_ids=ids[:, prefix:], position_ids=torch.arange(prefix, layout.length)[None],
                     attention_mask=mask_for_model(prefix_mask(len(gists), rest), model), cache=cache,
                     output_hidden_states=True).hidden_states


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("chunks", [(10,), (4, 6, 3)])
def test_question_states_depend_on_gists_alone_at_every_layer(attn, chunks):
    """Masked full pass == pass whose only memory is the gists' KV (the context is gone), at every layer."""
    model = _tiny(attn)
    layout = GistLayout(chunks, 3, 5, 2)
    torch.manual_seed(2)
    ids = torch.randint(3, 300, (1, layout.length))
    full = _hidden_states(model, ids, build_gist_mask([layout]).__dict__)
    from_gists = _question_states_from_gist_cache(model, ids, layout)
    after = slice(layout.prefix_length, layout.length)
    # eager runs its softmax in float32 even for a float64 model, so a last-bit difference can show there
    tolerance = 1e-10 if attn == "sdpa" else 1e-4
    for layer, (a, b) in enumerate(zip(full, from_gists)):
        assert torch.allclose(a[0, after], b[0], atol=tolerance), f"layer {layer} differs by {float((a[0, after] - b[0]).abs().max())}"
    # a plain causal pass lets the question read the context directly: it does not match
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True).hidden_states
    assert not torch.allclose(plain[-1][0, after], from_gists[-1][0], atol=1e-3)


def test_eager_and_sdpa_agree_under_the_same_mask():
    eager, sdpa = _tiny("eager"), _tiny("sdpa")
    layouts = [GistLayout((6, 4), 2, 3, 2), GistLayout((3,), 2, 4, 1)]
    batch = build_gist_mask(layouts).__dict__
    ids = torch.randint(3, 300, batch["position_ids"].shape)
    from gistctl.gist.forward import gist_forward

    with torch.no_grad():
        a = gist_forward(eager, {**batch, "input_ids": ids}).logits
        b = gist_forward(sdpa, {**batch, "input_ids": ids}).logits
    real = batch["kinds"] != PAD
    assert torch.allclose(a[real], b[real], atol=1e-5)
    assert not torch.isnan(a).any() and not torch.isnan(b).any()
