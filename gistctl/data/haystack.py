"""Filler text: where it comes from (built-in prose or the user's folder) and how it is cut to a token budget.

The built-in training haystack is the prose of the Python Language Reference as shipped in CPython's
standard library (`pydoc_data.topics`, the text `pydoc` shows; PSF-2.0), i.e. the same text as Debian's
`python3-doc`, present wherever Python is. Code samples, grammar rules, headings and lists are dropped.
Paul Graham essays and Wikipedia are deliberately not used: they are kept for held-out evaluation.
"""

from __future__ import annotations

import bisect
import importlib.util
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from gistctl.data.lengths import count_tokens_batch
from gistctl.errors import DataError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_WORDISH = re.compile(r"[A-Za-z]")

# Used only when `pydoc_data` is missing from a stripped-down Python; written for this project (Apache-2.0).
FALLBACK_PROSE = """\
The harbour town woke slowly in winter. Fishing boats rocked against the stone quay while gulls argued over \
the nets. Along the sea wall the lamps were still lit, and a baker carried trays of bread to the inn.

Every morning the ferry left for the islands at first light. Its captain kept a careful log of the weather, \
the tides and the number of passengers, and he read it aloud to anyone who asked.

Inland, the road climbed through orchards and small fields divided by hedges. Farmers met at the crossroads \
to trade seed and news. In spring the valley filled with blossom, and in autumn the cider presses ran all night.

The library stood at the top of the hill, a plain building with tall windows. Its readers came for maps, \
almanacs and old letters. The librarian knew where every shelf began and ended, and she rarely needed the catalogue.

When storms came in from the west, the whole town closed its shutters. Children counted the seconds between \
lightning and thunder, and the old men at the inn told stories about wrecks that nobody could prove.
"""


@dataclass
class Haystack:
    """Paragraphs of sentences plus where they came from (recorded in every record's meta)."""

    name: str
    license: str
    paragraphs: list[list[str]]

    @property
    def source(self) -> dict:
        return {"name": self.name, "license": self.license}


def split_paragraphs(text: str) -> list[list[str]]:
    """Blank-line separated paragraphs -> lists of sentences, whitespace collapsed."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        flat = " ".join(block.split())
        if not flat:
            continue
        sentences = [s.strip() for s in _SENTENCE_END.split(flat) if s.strip()]
        if sentences:
            paragraphs.append(sentences)
    return paragraphs


_NOTE = re.compile(r"^(New in version|Changed in version|Deprecated since version|Added in version)[^:]*:\s*")
MAX_SENTENCE_CHARS = 400  # longer "sentences" in the reference are lists run together; they make lengths coarse


def _prose_block(block: str) -> str | None:
    """A reference paragraph as one line of prose, or None for code, grammar, headings and fragments."""
    lines = block.splitlines()
    if not lines:
        return None
    indents = {len(line) - len(line.lstrip(" ")) for line in lines}
    if len(indents) > 1 and not (lines[0].lstrip().startswith("* ") and len(indents) == 2):
        return None  # code keeps its own indentation; wrapped prose and bullets do not
    if any(mark in block for mark in ("::=", ">>>", "***", "===", "---", "~~~", "...:")):
        return None
    flat = _NOTE.sub("", " ".join(block.split()).removeprefix("* "))
    if len(flat) < 80 or not flat.endswith((".", "!", "?")) or not flat[0].isupper():
        return None
    return flat if len(_WORDISH.findall(flat)) > 0.7 * len(flat) else None


def builtin_haystack() -> Haystack:
    """The Python Language Reference prose from `pydoc_data.topics`, or a short fallback without it."""
    if importlib.util.find_spec("pydoc_data") is not None:
        from pydoc_data.topics import topics

        blocks = []
        for key in sorted(topics):
            blocks.extend(filter(None, map(_prose_block, re.split(r"\n\s*\n", topics[key]))))
        paragraphs = [kept for p in split_paragraphs("\n\n".join(blocks))
                      if (kept := [s for s in p if len(s) <= MAX_SENTENCE_CHARS])]
        if paragraphs:
            return Haystack("python-language-reference (pydoc_data.topics)", "PSF-2.0", paragraphs)
    return Haystack("gistctl-fallback-prose", "Apache-2.0", split_paragraphs(FALLBACK_PROSE))


def haystack_from_dir(directory: str | Path) -> Haystack:
    """Every `*.txt` under `directory` (sorted, recursive), as paragraphs of sentences."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"haystack directory '{directory}' does not exist")
    files = sorted(p for p in directory.rglob("*.txt") if p.is_file())
    paragraphs = []
    for path in files:
        paragraphs.extend(split_paragraphs(path.read_text(encoding="utf-8", errors="replace")))
    if not paragraphs:
        raise DataError(f"haystack directory '{directory}' has no .txt files with text; add some plain-text files")
    return Haystack(f"haystack-dir:{directory.name}", "user-supplied", paragraphs)


def load_haystack(directory: str | Path | None) -> Haystack:
    return builtin_haystack() if directory is None else haystack_from_dir(directory)


# The classic passkey filler (Mohtashami & Jaggi, 2023): five sentences repeated.
CLASSIC_FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]


@dataclass
class FillerPool:
    """Filler pieces (a sentence with its trailing separator), each tokenized once.

    Counts are of `" " + sentence`, as a sentence reads inside running text; the assembled context is
    measured once more at the end, so these only have to be close.
    """

    pieces: list[str]
    counts: list[int]
    name: str = "filler"
    cumulative: list[int] = field(init=False)  # cumulative[i] = tokens of pieces[:i]

    def __post_init__(self):
        self.cumulative = [0]
        for c in self.counts:
            self.cumulative.append(self.cumulative[-1] + c)

    @property
    def total_tokens(self) -> int:
        return self.cumulative[-1]

    @classmethod
    def from_haystack(cls, tokenizer, haystack: Haystack) -> "FillerPool":
        pieces = []
        for paragraph in haystack.paragraphs:
            pieces.extend(s + " " for s in paragraph[:-1])
            pieces.append(paragraph[-1] + "\n\n")
        return cls(pieces, count_tokens_batch(tokenizer, [" " + p.strip() for p in pieces]), haystack.name)

    @classmethod
    def repeated(cls, tokenizer, sentences: list[str], min_tokens: int) -> "FillerPool":
        """`sentences` cycled until the pool holds at least `min_tokens` (tokenized once per sentence)."""
        counts = count_tokens_batch(tokenizer, [" " + s for s in sentences])
        reps = min_tokens // max(1, sum(counts)) + 2
        return cls([s + " " for s in sentences] * reps, counts * reps, "classic-passkey-filler")

    def start_for(self, rng: random.Random, budget: int) -> int:
        """A random first piece such that at least `budget` tokens follow it (0 when the pool is just enough)."""
        last = bisect.bisect_right(self.cumulative, self.total_tokens - budget) - 1
        return rng.randint(0, max(0, min(last, len(self.pieces) - 1)))

    def take(self, start: int, budget: int, slack: int = 0, search: int = 64) -> list[int]:
        """Contiguous pieces whose token sum is within `slack` of `budget`, beginning at `start` or, when
        sentence sizes make that miss, at one of the next `search` pieces; else the closest found."""
        best: tuple[int, int, int] | None = None
        for first in range(start, min(start + search, len(self.pieces))):
            goal = self.cumulative[first] + budget
            end = min(bisect.bisect_left(self.cumulative, goal, lo=first), len(self.pieces))
            if end > first and goal - self.cumulative[end - 1] < self.cumulative[end] - goal:
                end -= 1
            miss = abs(self.cumulative[end] - goal)
            if best is None or miss < best[0]:
                best = (miss, first, end)
            if miss <= slack:
                break
        _, first, end = best
        return list(range(first, end))


def compose(pool: FillerPool, indices: list[int], needles: list[tuple[float, str]]) -> tuple[str, list[int]]:
    """Filler pieces with needle sentences inserted on sentence boundaries at token depths (0..1).

    Returns the context and, per needle (in the order given), its character offset in the context.
    A needle at depth d goes before the first filler piece whose preceding filler tokens reach d * total.
    """
    filler_counts = [pool.counts[i] for i in indices]
    total = sum(filler_counts)
    prefix = [0]
    for c in filler_counts:
        prefix.append(prefix[-1] + c)
    slots = [min(bisect.bisect_left(prefix, depth * total), len(indices)) for depth, _ in needles]
    order = sorted(range(len(needles)), key=lambda k: (slots[k], k))
    parts: list[str] = []
    offsets = [0] * len(needles)
    length = 0
    pending = iter(order)
    nxt = next(pending, None)
    for position in range(len(indices) + 1):
        while nxt is not None and slots[nxt] == position:
            offsets[nxt] = length
            text = needles[nxt][1] + " "
            parts.append(text)
            length += len(text)
            nxt = next(pending, None)
        if position < len(indices):
            piece = pool.pieces[indices[position]]
            parts.append(piece)
            length += len(piece)
    return "".join(parts).rstrip(), offsets
