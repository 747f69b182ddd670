"""Where the stored gists sit in RoPE positions: the two layouts of a multi-chunk blob.

`sequential`: every chunk continues where the previous segment ended, as in one long sequence
`[chunk_1][gists_1][chunk_2][gists_2]...[question]`; the question of an 8k-token document starts past
position 8k and sees the first chunk's gists thousands of positions back.

`compact`: chunk i is read at positions right after the gists already kept (i x K), and its own gists'
keys are then rotated back by the chunk's length, so the kept gists occupy positions 0 .. n x K - 1
and the question starts at n x K. Every chunk and the question then see the earlier gists at the
distances a one-chunk document gives, however long the document. For a one-chunk document both
layouts give the same attention scores (RoPE depends only on distances), so they answer alike.

`auto`: chosen per document by its number of chunks: sequential up to `AUTO_SEQUENTIAL_CHUNKS`, compact
beyond. An adapter trained with sequential positions on documents of one or two chunks reads those best as
it was trained, and longer ones best compact (README, Results). A blob records the concrete layout its
document was read with; training with `auto` reads each example chunk by chunk in the layout compress
would choose for it (`layout_for`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gistctl.errors import DataError

if TYPE_CHECKING:
    import torch

SEQUENTIAL = "sequential"
COMPACT = "compact"
AUTO = "auto"
LAYOUTS = (SEQUENTIAL, COMPACT)  # concrete layouts: what a blob records and a chunk is read with
CHOICES = (*LAYOUTS, AUTO)  # what an adapter ships with, training reads with and compress / bench accept
AUTO_SEQUENTIAL_CHUNKS = 2  # auto: the most chunks read sequentially
# trained chunk by chunk, as compress reads (train.grad_chunks applies); sequential trains one masked forward
CHUNKED_LAYOUTS = (COMPACT, AUTO)
# RoPE variants whose frequencies do not depend on the sequence length, so a stored key can be re-rotated.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def check_layout(name: str, *, allow_auto: bool = False) -> str:
    choices = CHOICES if allow_auto else LAYOUTS
    if name not in choices:
        raise DataError(f"unknown gist position layout '{name}'; choose {', '.join(choices)}"
                        + ("" if allow_auto or name != AUTO else
                           f" ({AUTO} chooses one of them per document: resolve it with layout_for first)"))
    return name


def layout_for(layout: str, num_chunks: int) -> str:
    """The concrete layout a document of `num_chunks` chunks is read with under `layout`."""
    if check_layout(layout, allow_auto=True) != AUTO:
        return layout
    return SEQUENTIAL if num_chunks <= AUTO_SEQUENTIAL_CHUNKS else COMPACT


def rope_inv_freq(model) -> torch.Tensor:
    """(head_dim / 2,) inverse frequencies of the model's rotary embedding (Llama-family `rotate_half` RoPE)."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            rope_type = getattr(module, "rope_type", "default")
            if rope_type not in STATIC_ROPE_TYPES:
                raise DataError(f"the '{COMPACT}' gist layout re-rotates stored keys, which needs a static RoPE "
                                f"({', '.join(STATIC_ROPE_TYPES)}); this model uses '{rope_type}': "
                                f"use --positions {SEQUENTIAL}")
            return module.inv_freq
    raise DataError(f"the '{COMPACT}' gist layout needs a model with rotary position embeddings; "
                    f"use --positions {SEQUENTIAL}")


def rotate_keys(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys rotated at position p -> the same keys rotated at p + delta. keys: (..., T, head_dim).

    RoPE turns each pair (x_j, x_{j + d/2}) by angle p x inv_freq_j; rotations compose, so turning by
    delta x inv_freq_j moves a stored key exactly (up to rounding), whatever the layer.
    """
    import torch  # here, so that the bench's column parsing can import the layout names without torch

    angles = delta * inv_freq.to(keys.device, torch.float64)
    emb = torch.cat([angles, angles])
    cos, sin = emb.cos().to(keys.dtype), emb.sin().to(keys.dtype)
    half = keys.shape[-1] // 2
    rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
    return keys * cos + rotated_half * sin
