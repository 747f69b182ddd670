"""Questions over several documents: a pass key in one of 2 / 5 / 10 documents, the others without a key, against
the same question asked of the right document alone (issue "Warm and shared", item 3).

    python benchmarks/multidoc.py --n 40 --out runs/multidoc

Key documents: `gistctl data passkey --key-format alnum6 --tokens 512..2k` drawn with --seed (default 9301, no
training recipe uses it). Distractors: the same classic filler at 512-2k tokens with no key (--seed + 1). Every
blob is compressed once; each question is asked alone and with 1, 4 and 9 distractors placed around the right
document at random. Two ways of reading the blobs side by side are compared: `aligned` (what gistctl does: each
blob's keys re-rotated so its gists sit just before the question, as when asked alone) and `raw` (blobs
concatenated as stored, the question after the latest of them). Writes results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch


def distractor_texts(tokenizer, n: int, seed: int) -> list[str]:
    from gistctl.data.haystack import CLASSIC_FILLER, FillerPool, compose

    rng = random.Random(seed)
    pool = FillerPool.repeated(tokenizer, CLASSIC_FILLER, 2600)
    texts = []
    for _ in range(n):
        budget = rng.randint(512, 2000)
        texts.append(compose(pool, pool.take(pool.start_for(rng, budget), budget), [])[0])
    return texts


def raw_answer(gm, blobs, question: str, max_new_tokens: int):
    """Blobs concatenated as stored (no re-rotation): the question after the latest next_position."""
    from transformers import DynamicCache

    from gistctl import prompt
    from gistctl.generation import greedy_generate

    param = next(gm.model.parameters())
    keys = torch.cat([b.keys.to(param.device, param.dtype) for b in blobs], dim=2)
    values = torch.cat([b.values.to(param.device, param.dtype) for b in blobs], dim=2)
    cache = DynamicCache(ddp_cache_data=[(keys[i:i + 1], values[i:i + 1]) for i in range(keys.shape[0])],
                         config=gm.model.config)
    return greedy_generate(gm.model, gm.tokenizer, prompt.question_ids(gm.tokenizer, question), cache=cache,
                           cache_length=keys.shape[2], first_position=max(b.meta.next_position for b in blobs),
                           max_new_tokens=max_new_tokens, stop_ids=prompt.stop_ids(gm.model, gm.tokenizer),
                           suppress_ids=gm.gist_ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40, help="questions (key documents)")
    parser.add_argument("--seed", type=int, default=9301)
    parser.add_argument("--sizes", default="1,2,5,10", help="documents per question")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--out", default="runs/multidoc")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)

    import gistctl
    from gistctl.data.builders import build_passkey
    from gistctl.data.lengths import parse_lengths
    from gistctl.kv.answer import answer_from_blobs
    from gistctl.scoring import passkey_match

    sizes = [int(s) for s in args.sizes.split(",")]
    gc = gistctl.load(adapter=args.adapter, device="cpu")
    gm = gc.gist_model
    records = list(build_passkey(gm.tokenizer, n=args.n, seed=args.seed, tokens=parse_lengths("512..2k"),
                                 key_format="alnum6"))
    started = time.perf_counter()
    keyed = [gc.compress(r["context"]) for r in records]
    others = [gc.compress(t) for t in distractor_texts(gm.tokenizer, max(sizes) - 1, args.seed + 1)]
    compress_s = time.perf_counter() - started
    rng = random.Random(args.seed + 2)
    rows = []
    for i, (record, blob) in enumerate(zip(records, keyed)):
        key = record["answers"][0]
        for size in sizes:
            chosen = rng.sample(others, size - 1)
            at = rng.randint(0, size - 1)
            blobs = chosen[:at] + [blob] + chosen[at:]
            for layout in (("aligned", "raw") if size > 1 else ("aligned",)):
                if layout == "aligned":
                    gen = answer_from_blobs(gm, blobs, record["question"], max_new_tokens=args.max_new_tokens)
                else:
                    gen = raw_answer(gm, blobs, record["question"], args.max_new_tokens)
                rows.append({"id": record["id"], "documents": size, "position": at, "layout": layout, "key": key,
                             "answer": gen.text, "right": passkey_match(gen.text, key), "ttft_ms": gen.ttft_s * 1000})
        print(f"{i + 1}/{len(records)}", file=sys.stderr, flush=True)
    table = []
    alone = [r for r in rows if r["documents"] == 1]
    base = sum(r["right"] for r in alone) / len(alone)
    for size in sizes:
        for layout in ("aligned", "raw"):
            picked = [r for r in rows if r["documents"] == size and (r["layout"] == layout or size == 1)]
            if not picked or (size == 1 and layout == "raw"):
                continue
            acc = sum(r["right"] for r in picked) / len(picked)
            table.append({"documents": size, "layout": layout, "n": len(picked), "accuracy": acc,
                          "retention": acc / base if base else None,
                          "ttft_ms_mean": sum(r["ttft_ms"] for r in picked) / len(picked)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "compress_s": compress_s, "table": table,
                                                  "rows": rows}, indent=1))
    print("| documents | reading | n | pass keys right | vs alone | mean TTFT ms |")
    print("|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['documents']} | {t['layout']} | {t['n']} | {t['accuracy']:.1%} | "
              f"{t['retention']:.2f} | {t['ttft_ms_mean']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
