"""How a document longer than one chunk is split into ceil(tokens / chunk_tokens) chunks, each read by its own K gists.

`fixed` fills every chunk but the last (1,300 tokens -> 1,024 + 276); `even` makes them equal to within a token
(650 + 650), so no set of gists reads more tokens than it must. Both give the same number of chunks, so the
same number of gists and blob bytes. No torch here: configs import it.
"""

from __future__ import annotations

from itertools import accumulate

from gistctl.errors import DataError

FIXED, EVEN = "fixed", "even"
CHUNKINGS = (FIXED, EVEN)


def check_chunking(chunking: str) -> str:
    if chunking not in CHUNKINGS:
        raise DataError(f"unknown chunking '{chunking}'; choose from {', '.join(CHUNKINGS)}")
    return chunking


def split_chunks(ids: list[int], chunk_tokens: int, chunking: str = FIXED) -> list[list[int]]:
    """Split on token boundaries into ceil(len / chunk_tokens) chunks of at most `chunk_tokens` (one empty
    chunk for no tokens): `fixed` fills all but the last, `even` sizes them within one token of each other."""
    if not ids:
        return [[]]
    if check_chunking(chunking) == FIXED:
        return [ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]
    n = -(-len(ids) // chunk_tokens)
    size, longer = divmod(len(ids), n)  # the first `longer` chunks get one token more
    bounds = list(accumulate([0] + [size + (i < longer) for i in range(n)]))
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]
