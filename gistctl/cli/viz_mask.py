"""`gistctl viz-mask`: draw the gist attention mask of a layout or of real examples."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from gistctl.cli.common import console, user_errors
from gistctl.config import GistSettings
from gistctl.errors import ConfigError, DataError, ModelLoadError
from gistctl.gist.mask import GistLayout
from gistctl.gist.tokens import gist_token_names
from gistctl.gist.viz import FORMATS, MAX_PANELS, describe, draw_mask, figure_pixels
from gistctl.runs import RunDir

DEFAULT_LENGTHS = {"context": [40], "question": 8, "answer": 4}
DEFAULT_MAX_LENGTH = 1024  # as configs/gist_*.yaml train with


@user_errors
def viz_mask(
    num_gist: int = typer.Option(GistSettings.num_gist, "--num-gist", "--gist", "-k", help="K: gist tokens after each chunk."),
    context: list[str] = typer.Option(None, help="Context length in tokens; several (repeat or '300,200') draw "
                                                 "the multi-chunk layout. Default 40."),
    question: int = typer.Option(None, help="Question tokens. Default 8."),
    answer: int = typer.Option(None, help="Answer tokens. Default 4."),
    example: list[str] = typer.Option(None, help="FILE.jsonl:N, the example on line N (counted from 1, as in an "
                                                 f"editor); repeat for a left-padded batch (up to {MAX_PANELS})."),
    model: str = typer.Option(None, help="--example: tokenizer of this model (HF id or local dir); default: embedded "
                                         "SmolLM2-135M-Instruct."),
    max_length: int = typer.Option(None, help=f"--example: cut the context to fit this many tokens "
                                              f"(default {DEFAULT_MAX_LENGTH})."),
    chunk_tokens: int = typer.Option(None, help=f"Split the context into chunks of this many tokens (default for "
                                                f"--example: {GistSettings.chunk_tokens}; none for --context)."),
    output: Path = typer.Option(None, "--output", "-o", help="Picture to write (.png, .svg, .pdf); default: "
                                                             "mask.png in a new run directory under runs/."),
    dpi: int = typer.Option(150, help="Dots per inch; a one-panel PNG is {} x {} pixels at 150."
                                      .format(*figure_pixels(1, 150))),
) -> None:
    """Draw the gist attention mask: segments on both axes, attend / blocked / padding in colour.

    Give lengths (--num-gist 25 --context 40 --question 8 --answer 4) or real examples (--example data.jsonl:3),
    tokenised by the collator training uses.
    """
    _check_positive(num_gist=num_gist, dpi=dpi, max_length=max_length, chunk_tokens=chunk_tokens)
    if output is not None and output.suffix.lstrip(".").lower() not in FORMATS:
        raise ConfigError(f"--output '{output}': use a .png, .svg or .pdf name")
    if example:
        if context or question is not None or answer is not None:
            raise ConfigError("--example takes its lengths from the data; drop --context/--question/--answer")
        if len(example) > MAX_PANELS:
            raise ConfigError(f"--example given {len(example)} times; draw at most {MAX_PANELS} examples at once")
        layouts, labels = _example_layouts(example, num_gist, model, max_length or DEFAULT_MAX_LENGTH,
                                           chunk_tokens or GistSettings.chunk_tokens)
    else:
        if model is not None or max_length is not None:
            raise ConfigError("--model and --max-length only apply with --example")
        chunks = _parse_chunks(context) if context else DEFAULT_LENGTHS["context"]
        if chunk_tokens:
            chunks = [piece for n in chunks for piece in _split_length(n, chunk_tokens)]
        question = DEFAULT_LENGTHS["question"] if question is None else question
        answer = DEFAULT_LENGTHS["answer"] if answer is None else answer
        if question < 0 or answer < 0:
            raise ConfigError("--question and --answer must be >= 0")
        layouts, labels = [GistLayout(tuple(chunks), num_gist, question, answer)], None

    if output is None:
        config = {"num_gist": num_gist, "context": context, "question": question, "answer": answer, "example": example,
                  "model": model, "max_length": max_length, "chunk_tokens": chunk_tokens, "dpi": dpi}
        output = RunDir.create("viz-mask", config).file("mask.png")
    path = draw_mask(layouts, output, labels=labels, dpi=dpi)
    for index, layout in enumerate(layouts):
        console.print(f"{labels[index] + ': ' if labels else ''}{describe(layout)}", highlight=False, soft_wrap=True)
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _parse_chunks(values: list[str]) -> list[int]:
    """['300,200', '100'] -> [300, 200, 100]."""
    try:
        chunks = [int(part) for value in values for part in value.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--context takes token counts like 40 or 300,200, got {' '.join(values)!r}") from None
    if not chunks or min(chunks) < 0:
        raise ConfigError(f"--context lengths must be >= 0, got {' '.join(values)!r}")
    return chunks


def _split_length(n: int, chunk_tokens: int) -> list[int]:
    """Chunk lengths the collator would cut `n` context tokens into (one empty chunk for none)."""
    return [min(chunk_tokens, n - start) for start in range(0, n, chunk_tokens)] or [0]


def _parse_example(spec: str) -> tuple[Path, int]:
    """'data.jsonl:3' -> (data.jsonl, 3); a bare path means line 1."""
    path, sep, line = spec.rpartition(":")
    if not sep or not line.isdigit():
        return Path(spec), 1
    if int(line) < 1:
        raise DataError(f"--example '{spec}': lines are counted from 1")
    return Path(path), int(line)


def read_example(path: Path, line: int) -> dict:
    """The JSON record on line `line` (from 1) of a JSONL file."""
    if not path.is_file():
        raise DataError(f"example file '{path}' does not exist")
    count = 0
    try:
        with path.open(encoding="utf-8") as fh:
            for count, text in enumerate(fh, start=1):
                if count == line:
                    break
            else:
                raise DataError(f"'{path}' has {count} lines; line {line} asked for (lines count from 1)")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read '{path}' as UTF-8 JSONL: {err}") from err
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{line} is not a JSON object: {err}") from err
    if not isinstance(record, dict) or not isinstance(record.get("context"), str) or "question" not in record:
        raise DataError(f"{path}:{line} needs string fields 'context' and 'question' and an 'answers' list")
    return record


def _example_layouts(specs: list[str], gist: int, model: str | None, max_length: int,
                     chunk_tokens: int) -> tuple[list[GistLayout], list[str]]:
    from gistctl.gist.collate import GistCollator

    records = []
    for spec in specs:
        path, line = _parse_example(spec)
        records.append((f"{path.name}:{line}", read_example(path, line)))
    tokenizer = _load_tokenizer(model)
    # Only the layout is drawn, so the tokenizer alone is enough: gist tokens are added to it, not to a model.
    names = gist_token_names(gist)
    tokenizer.add_tokens([n for n in names if n not in tokenizer.get_vocab()], special_tokens=True)
    collator = GistCollator(tokenizer, tokenizer.convert_tokens_to_ids(names), max_length, chunk_tokens)
    layouts, labels = [], []
    for label, record in records:
        encoded = collator.encode(record)
        layouts.append(encoded.layout)
        name = f"{label} (id {record['id']})" if record.get("id") is not None else label
        if encoded.truncated_tokens:
            name += f", context cut by {encoded.truncated_tokens} tokens to fit --max-length {max_length}"
        labels.append(name)
    return layouts, labels


def _load_tokenizer(spec: str | None):
    from transformers import AutoTokenizer

    from gistctl.models import resolve_model_path

    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the tokenizer of '{spec or path}': {err}".splitlines()[0]) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
