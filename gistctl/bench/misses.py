"""Where a gist answer went wrong: teacher-force the right answer on the bench's own blobs.

    python -m gistctl.bench.misses runs/bench-auto-passkey [--spell-codes]

For every wrong gist answer of a bench run (its `predictions.jsonl`, blobs kept under the run), the right
answer is scored token by token from the same blob (`answer_ranks`): the first token greedy decoding did not
choose, that token's rank, and what was chosen instead: `end` (the answer stopped), `skip` (a later piece of
the right answer: one was left out), or `other`. `--spell-codes` scores codes one character per token, as an
adapter trained with `train.spell_codes` answers them.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gistctl import prompt
from gistctl.engine import open_gist_model
from gistctl.kv.answer import answer_ranks, check_blob_for_model
from gistctl.kv.blob import read_blob


@dataclass
class Miss:
    id: str
    answer: str
    prediction: str
    position: int | None  # index of the first right-answer token greedy decoding did not choose (None: all chosen)
    rank: int | None  # that token's rank (1 = second choice)
    chose: str  # "end", "skip" or "other" ("" when position is None)
    chosen_text: str


def first_miss(tokenizer, answer_ids: list[int], ranks: list[tuple[int, int]], stop_ids: set[int]):
    """(position, rank, kind, chosen text) of the first token of `answer_ids` greedy decoding would not pick."""
    for i, (rank, chosen) in enumerate(ranks):
        if rank == 0:
            continue
        text = tokenizer.decode([chosen])
        later = tokenizer.decode(answer_ids[i + 1 :], skip_special_tokens=True)
        if chosen in stop_ids:
            kind = "end"
        elif text.strip() and later.startswith(text.strip()):
            kind = "skip"
        else:
            kind = "other"
        return i, rank, kind, text
    return None, None, "", ""


def run_misses(run_dir: str | Path, *, spell_codes: bool = False) -> list[Miss]:
    """One `Miss` per wrong gist answer with a kept blob in the bench run `run_dir`."""
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]
    models, misses = {}, []
    for row in rows:
        if row.get("kind") != "gist" or not row.get("blob") or row.get("error") or row["primary"] >= 1:
            continue
        blob = read_blob(run_dir / row["blob"])
        key = (blob.meta.model_id, blob.meta.adapter, blob.meta.num_gist, blob.meta.chunk_tokens)
        if key not in models:
            models[key] = open_gist_model(blob.meta.model_id, blob.meta.adapter or "none",
                                          num_gist=blob.meta.num_gist, chunk_tokens=blob.meta.chunk_tokens)
        gm = models[key]
        check_blob_for_model(blob, gm, where=f"blob '{row['blob']}'")
        answer = row["answers"][0]
        ids = prompt.answer_ids(gm.tokenizer, answer, spell_codes=spell_codes)
        ranks = answer_ranks(gm, blob, row["question"], ids)
        position, rank, kind, text = first_miss(gm.tokenizer, ids, ranks, prompt.stop_ids(gm.model, gm.tokenizer))
        misses.append(Miss(row["id"], answer, row["prediction"], position, rank, kind, text))
    return misses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--spell-codes", action="store_true", help="score codes one character per token")
    args = parser.parse_args(argv)
    misses = run_misses(args.run_dir, spell_codes=args.spell_codes)
    for m in misses:
        print(f"{m.id}\t{m.answer}\t{m.prediction!r}\tfirst wrong token {m.position}, rank {m.rank}, "
              f"chose {m.chose} {m.chosen_text!r}")
    ranks = Counter("1" if m.rank == 1 else "2+" if m.rank else "none" for m in misses)
    kinds = Counter(m.chose for m in misses if m.rank == 1)
    print(f"{len(misses)} misses; right token second choice in {ranks['1']}, lower in {ranks['2+']}; "
          f"when second, greedy chose: end {kinds['end']}, skip {kinds['skip']}, other {kinds['other']}")


if __name__ == "__main__":
    main()
