"""Where a gist answer went wrong: teacher-force the right answer on the bench's own blobs.

    gistctl analyze misses runs/bench-auto-passkey [--spell-codes]

For every gist answer of a bench run (its `predictions.jsonl`, blobs kept under the run), the right answer
is scored token by token from the same blob (`answer_ranks`): its negative log-likelihood (graded, where exact
match is all or nothing, so it can tell adapters apart on sets too small for their accuracies to) and,
for a wrong answer, the first token greedy decoding did not choose, that token's rank, and what was chosen
instead: `end` (the answer stopped), `skip` (a later piece of the right answer: one was left out), or
`other`. `--spell-codes` scores codes one character per token, as an adapter trained with
`train.spell_codes` answers them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gistctl import prompt
from gistctl.bench.analysis import check_run_dir
from gistctl.engine import load_for_blob
from gistctl.kv.answer import answer_from_blob, answer_ranks, check_blob_for_model
from gistctl.kv.blob import read_blob


@dataclass
class Scored:
    id: str
    method: str  # the bench column
    correct: bool
    answer: str
    prediction: str
    # -log P(the right answer + end-of-turn) from the blob, nats: in the tokenizer's pieces, or in greedy
    # decoding's own when it spelled the answer right in other pieces ("R Z TD IV" for "RZ TD IV"), the likelier
    nll: float
    position: int | None  # index of the first right-answer token greedy decoding did not choose (None: all chosen)
    rank: int | None  # that token's rank (1 = second choice)
    chose: str  # "end", "skip" or "other" ("" when position is None)
    chosen_text: str


def first_miss(tokenizer, answer_ids: list[int], ranks: list[tuple[int, int, float]], stop_ids: set[int]):
    """(position, rank, kind, chosen text) of the first token of `answer_ids` greedy decoding would not pick."""
    for i, (rank, chosen, _) in enumerate(ranks):
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


def score_run(run_dir: str | Path, *, spell_codes: bool = False) -> list[Scored]:
    """Every gist answer with a kept blob in the bench run `run_dir`, the right answer scored from its blob."""
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]
    models, scored = {}, []
    for row in rows:
        if row.get("kind") != "gist" or not row.get("blob") or row.get("error"):
            continue
        blob = read_blob(run_dir / row["blob"])
        key = (blob.meta.model_id, blob.meta.adapter, blob.meta.num_gist, blob.meta.chunk_tokens)
        if key not in models:  # one model per bench column, not one per blob
            models[key] = load_for_blob(blob.meta).gist_model
        gm = models[key]
        check_blob_for_model(blob, gm, where=f"blob '{row['blob']}'")
        answer = row["answers"][0]
        ids = prompt.answer_ids(gm.tokenizer, answer, spell_codes=spell_codes)
        ranks = answer_ranks(gm, blob, row["question"], ids)
        position, rank, kind, text = first_miss(gm.tokenizer, ids, ranks, prompt.stop_ids(gm.model, gm.tokenizer))
        nll = -sum(lp for _, _, lp in ranks)
        if row["prediction"] == answer:  # right: its own pieces may be likelier than the tokenizer's
            # a token is at least a character: the text equals the answer only if decoding stopped right after it
            greedy = answer_from_blob(gm, blob, row["question"], max_new_tokens=len(answer) + 1)
            if greedy.text == answer and greedy.token_ids != ids[:-1]:
                own = greedy.token_ids + [gm.tokenizer.eos_token_id]
                nll = min(nll, -sum(lp for _, _, lp in answer_ranks(gm, blob, row["question"], own)))
        scored.append(Scored(row["id"], row["method"], row["primary"] >= 1, answer, row["prediction"],
                             nll, position, rank, kind, text))
    return scored


def summary(scored: list[Scored]) -> dict[str, dict]:
    """Per bench column: n, right, mean and median answer NLL (nats), misses by the first passed-over token."""
    out = {}
    for method in dict.fromkeys(s.method for s in scored):
        rows = [s for s in scored if s.method == method]
        nll = sorted(s.nll for s in rows)
        misses = [s for s in rows if not s.correct]
        out[method] = {"n": len(rows), "right": len(rows) - len(misses), "mean_nll": sum(nll) / len(nll),
                       "median_nll": nll[len(nll) // 2], "misses_second_choice": sum(s.rank == 1 for s in misses),
                       "misses_by_choice": dict(Counter(s.chose for s in misses if s.rank == 1))}
    return out


def report_lines(run_dir: str | Path, *, spell_codes: bool = False) -> list[str]:
    """`gistctl analyze misses RUN`: each miss, then a summary line per bench column."""
    scored = score_run(check_run_dir(run_dir), spell_codes=spell_codes)
    lines = []
    for m in (s for s in scored if not s.correct):
        lines.append(f"{m.method}\t{m.id}\t{m.answer}\t{m.prediction!r}\tfirst wrong token {m.position}, rank {m.rank}, "
              f"chose {m.chose} {m.chosen_text!r}")
    for method, row in summary(scored).items():
        lines.append(f"{method}: {row['right']}/{row['n']} right; answer NLL mean {row['mean_nll']:.3f}, median "
              f"{row['median_nll']:.3f} nats; misses with the right token second: {row['misses_second_choice']} "
              f"of {row['n'] - row['right']} {row['misses_by_choice']}")
    return lines
