"""Press variants on a development set (SQuAD's `dev` split: articles of the train file bucketed apart from both the
training and the bench's `eval` articles): which way of choosing kept entries holds answers
best at 8x and 16x fewer entries. Each document is prefilled and scored once per scoring; every selection rule is
then asked from a real blob (written in memory, read back through the engine) with the shipped full-reader.

    gistctl data squad --from data/squad.json --split dev --tokens 1k..4k --n 30 --seed 7301 -o data/dev/squad_dev30.jsonl
    python benchmarks/press_dev.py --data data/dev/squad_dev30.jsonl --out runs/press-dev/rows.jsonl

Rows are appended as they come (a rerun skips the (id, variant, ratio) rows already there); `--summary` prints mean
F1 per variant and ratio. Never point it at held-out data (essays, HotpotQA, the wiki summaries, examples/).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gistctl.engine import DEFAULT_READER, Gistctl, open_reader_model
from gistctl.kv.answer import answer_ranks
from gistctl.kv.press import prefill_document, press_blob
from gistctl.kv.presses import select_kept
from gistctl.kv.presses.base import kept_per_head
from gistctl.kv.presses.kvzip import KVzipPress
from gistctl.scoring import score


def pooled(scores: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pool = torch.nn.functional.max_pool1d if mode == "max" else torch.nn.functional.avg_pool1d
    return pool(flat, kernel, stride=1, padding=kernel // 2).reshape(scores.shape)


def floored(scores: torch.Tensor, ratio: float, protected: int, alpha: float, per: str) -> torch.Tensor:
    """Every head (`per` "head": AdaKV's safeguard) or every layer (`per` "layer") first keeps its best alpha x its
    equal share; the rest of the budget goes to one global threshold. alpha 1 per layer: one threshold per layer."""
    layers, heads, n = scores.shape
    per_head = kept_per_head(n, ratio, protected)
    s = scores.float().clone()
    s[..., :protected] = float("inf")
    groups = s.view(layers * heads, n) if per == "head" else s.view(layers, heads * n)
    floor = int(alpha * per_head * groups.shape[1] // n)
    if floor:
        groups.scatter_(-1, groups.topk(floor, dim=-1).indices, float("inf"))
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep.view(-1)[s.flatten().topk(per_head * layers * heads).indices] = True
    return keep


VARIANTS = "kvzip,kvzip-avg5,kvzip-max3,kvzip-safeguard0.2,kvzip-layerwise,kvzip+,kvzip+-max3"


def select(name: str, scored: dict[str, torch.Tensor], ratio: float, protected: int) -> torch.Tensor:
    """`<scoring>[-<rule>]`: scoring kvzip or kvzip+; rule avgK / maxK (pool the scores over K neighbours, then one
    threshold), safeguardA (AdaKV's floor), layerfloorA (the same per layer), layerwise (one threshold per layer); none: one global threshold."""
    scoring, _, rule = name.partition("-")
    s = scored[scoring]
    if not rule:
        return select_kept(s, ratio, "global", protected)
    if rule.startswith(("avg", "max")):
        return select_kept(pooled(s, int(rule[3:]), rule[:3]), ratio, "global", protected)
    if rule.startswith("safeguard"):
        return floored(s, ratio, protected, float(rule[len("safeguard"):]), "head")
    if rule.startswith("layerfloor"):
        return floored(s, ratio, protected, float(rule[len("layerfloor"):]), "layer")
    if rule == "layerwise":
        return floored(s, ratio, protected, 1.0, "layer")
    raise SystemExit(f"unknown variant {name}")


def summary(path: Path, metric: str) -> None:
    cells = defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        cells[(row["variant"], row["ratio"])].append(row[metric])
    full = cells.get(("full", 0.0), [])
    base = sum(full) / len(full) if full else float("nan")
    print(f"{'variant':22} {'ratio':>6} {'n':>3} {metric:>6} {'/ full':>9}")
    for (variant, ratio), f1 in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        mean = sum(f1) / len(f1)
        print(f"{variant:22} {ratio:6.4f} {len(f1):3d} {mean:6.3f} {(mean / base if base else float('nan')):9.2f}")


def kept_by_layer(scores_dir: Path, variant: str, ratios: list[float]) -> None:
    """The share of each layer's entries a variant keeps, averaged over the cached documents' scores."""
    files = sorted(scores_dir.glob("*.safetensors"))
    for ratio in ratios:
        shares = torch.stack([select(variant, load_file(str(f)), ratio, 4).float().mean(dim=(1, 2)) for f in files])
        print(f"{variant} {ratio}: kept share per layer over {len(files)} documents (min / max layer: "
              f"{shares.mean(0).min():.3f} / {shares.mean(0).max():.3f})")
        print("  " + " ".join(f"{v:.2f}" for v in shares.mean(0).tolist()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ratios", default="0.875,0.9375")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--kept-by-layer", action="store_true", help="per-layer kept share from --scores-dir, no model")
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--meter", choices=["f1", "nll"], default="f1",
                    help="f1: greedy answer scored; nll: mean negative log-likelihood of the gold answer's tokens")
    ap.add_argument("--scores-dir", type=Path, default=None, help="cache of each document's scores (safetensors)")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.kept_by_layer:
        for variant in args.variants.split(","):
            kept_by_layer(args.scores_dir, variant, ratios)
        return
    if args.summary:
        summary(args.out, args.meter)
        return
    records = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    if args.limit:
        records = records[: args.limit]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            row = json.loads(line)
            done.add((row["id"], row["variant"], row["ratio"]))
    gm = open_reader_model(None, DEFAULT_READER)
    api = Gistctl(gm, gm)
    with args.out.open("a") as out:
        for i, record in enumerate(records):
            text, question = record["context"], record["question"]
            t0 = time.perf_counter()
            doc = prefill_document(gm, text)
            prefill_s = time.perf_counter() - t0
            scorings = sorted({v.partition("-")[0] for v in args.variants.split(",")})
            cached = args.scores_dir / f"{record['id']}.safetensors" if args.scores_dir else None
            scored = load_file(cached) if cached and cached.exists() else {}
            score_s = {}
            for name in scorings:
                if name in scored:
                    continue
                t1 = time.perf_counter()
                scored[name] = KVzipPress(normalize=name == "kvzip+").score(doc)
                score_s[name] = time.perf_counter() - t1
            if cached and score_s:
                cached.parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in scored.items()}, str(cached))
            todo = [("full", 0.0, torch.ones_like(scored[scorings[0]], dtype=torch.bool))]
            for ratio in ratios:
                todo += [(v, ratio, select(v, scored, ratio, doc.protected)) for v in args.variants.split(",")]
            for variant, ratio, keep in todo:
                if (record["id"], variant, ratio) in done:
                    continue
                blob = press_blob(gm, doc, text, keep, press="kvzip", ratio=ratio, budget="global")
                row = {"id": record["id"], "variant": variant, "ratio": ratio, "tokens": doc.length,
                       "prefill_s": prefill_s, "score_s": score_s}
                if args.meter == "nll":
                    answer_ids = gm.tokenizer(record["answers"][0], add_special_tokens=False)["input_ids"]
                    ranks = answer_ranks(gm, blob, question, answer_ids)
                    row.update(nll=-sum(lp for _, _, lp in ranks) / len(ranks),
                               greedy_tokens=sum(rank == 0 for rank, _, _ in ranks) / len(ranks))
                else:
                    answer = api.ask(blob, question, max_new_tokens=args.max_new_tokens)
                    row.update(f1=score(record["task"], answer.text, record["answers"], record.get("meta"))["primary"],
                               prediction=answer.text)
                out.write(json.dumps(row) + "\n")
                out.flush()
            print(f"{i + 1}/{len(records)} {record['id']} {doc.length} tokens prefill {prefill_s:.1f}s "
                  f"score {', '.join(f'{k} {v:.1f}s' for k, v in score_s.items())}", flush=True)


if __name__ == "__main__":
    main()
