"""`make demo`'s three questions from kvzip press blobs of its document at each ratio (exact match of the gold).

    python benchmarks/demo_ratios.py

A measurement only: examples/ is held out, never used to pick a ratio (the demo's comes from the frontier bench).
"""

from __future__ import annotations

import gistctl
from gistctl.demo import EXAMPLE_DOCUMENT, EXAMPLE_QUESTIONS

GOLD = ("Ada Lindqvist", "MRW-7", "1887")


def main() -> None:
    gc = gistctl.load()
    text = EXAMPLE_DOCUMENT.read_text(encoding="utf-8")
    for ratio in (0.0, 0.75, 0.875, 0.9375, 0.97):
        blob = gc.compress(text, press="kvzip" if ratio else "none", ratio=ratio)
        answers = gc.ask(blob, list(EXAMPLE_QUESTIONS), max_new_tokens=24)
        hits = sum(gold.lower() in a.text.lower() for gold, a in zip(GOLD, answers))
        shown = " | ".join(a.text.strip().replace("\n", " ")[:40] for a in answers)
        print(f"ratio {ratio:<6} {hits}/3  {shown}", flush=True)


if __name__ == "__main__":
    main()
