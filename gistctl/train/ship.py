"""Ship a trained checkpoint as a named adapter inside the package (`gistctl/adapters/<name>/`).

    python -m gistctl.train.ship runs/default/final default [--note "..."]
    python -m gistctl.train.ship gistctl/adapters/default default --positions auto   # re-ship, re-tuned

Copies the adapter files (not the optimizer state) into a temp directory, writes `meta.json` (recipe =
the run's resolved config, data fingerprints, step, every evaluation, adapter fingerprint), then swaps it
into place.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from gistctl.gist.lora import GIST_META, SHIPPED_ADAPTERS, adapter_fingerprint, read_gist_meta
from gistctl.kv.positions import CHOICES, SEQUENTIAL, check_layout
from gistctl.runs import atomic_write_json, replace_dir

FILES = ("adapter_config.json", "adapter_model.safetensors", GIST_META, "config.yaml", "tokenizer.json",
         "tokenizer_config.json", "chat_template.jinja")


def ship_adapter(checkpoint: str | Path, name: str, *, note: str | None = None, chunk_tokens: int | None = None,
                 positions: str | None = None, target_root: Path = SHIPPED_ADAPTERS) -> Path:
    """`chunk_tokens` / `positions`: the chunk length and gist position layout compress uses with this
    adapter, when a measured bench (--chunk-tokens, --positions) favours other ones than it was trained
    with; meta.json records both."""
    if positions is not None:
        check_layout(positions, allow_auto=True)
    checkpoint = Path(checkpoint)
    source_meta = json.loads((checkpoint / "meta.json").read_text())
    target = target_root / name
    tmp = target_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in FILES:
        if (checkpoint / file).is_file():
            shutil.copy2(checkpoint / file, tmp / file)
    if "recipe" in source_meta:  # an adapter shipped before: keep its record, change only what is asked
        meta = {**source_meta, "name": name}
    else:
        meta = {
            "name": name,
            "source": str(checkpoint),
            "adapter_fingerprint": adapter_fingerprint(tmp),
            "step": source_meta["step"],
            "seed": source_meta["seed"],
            "recipe": yaml.safe_load((checkpoint / "config.yaml").read_text()),
            "data": source_meta["data"],
            "evals": [{"step": e["step"], "overall": e["eval"]["overall"], "per_task": e["eval"]["per_task"],
                       "n": e["eval"]["n"]} for e in source_meta.get("evals", [])],
            "best_eval": source_meta.get("best_eval"),
        }
        if source_meta.get("phases"):  # a curriculum: every phase's recipe, data and evals
            meta["phases"] = source_meta["phases"]
    shipped = {key: value for key, value in (("chunk_tokens", chunk_tokens), ("positions", positions))
               if value is not None}
    if shipped:
        gist = read_gist_meta(tmp)
        trained = {"chunk_tokens": gist["chunk_tokens"], "positions": gist.get("positions", SEQUENTIAL)}
        for key, value in shipped.items():
            earlier = meta.get(key)  # a re-ship keeps the trained value recorded the first time
            meta[key] = {"trained": earlier["trained"] if isinstance(earlier, dict) else trained[key], "shipped": value}
        atomic_write_json(tmp / GIST_META, {**gist, **shipped})
    if note:
        meta["note"] = f"{meta['note']} {note}" if meta.get("note") else note
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return replace_dir(tmp, target)


def main() -> None:
    parser = argparse.ArgumentParser(description="Ship a checkpoint as gistctl/adapters/<name>/.")
    parser.add_argument("checkpoint")
    parser.add_argument("name")
    parser.add_argument("--note")
    parser.add_argument("--chunk-tokens", type=int, help="chunk length compress uses (default: the trained one)")
    parser.add_argument("--positions", choices=CHOICES, help="gist position layout (default: the trained one; auto: per document)")
    args = parser.parse_args()
    print(ship_adapter(args.checkpoint, args.name, note=args.note, chunk_tokens=args.chunk_tokens,
                       positions=args.positions))


if __name__ == "__main__":
    main()
