"""`gistctl ask`: answer questions from a gist blob, or from the document with --method full|rag."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from gistctl.cli.common import err_console, user_errors
from gistctl.engine import DEFAULT_READER, load_for_blob, reader_for, open_text_method, read_document, read_questions
from gistctl.kv.blob import read_blob
from gistctl.store import ID_PATTERN, BlobStore
from gistctl.errors import DataError
from gistctl.prompt import check_question


@user_errors
def ask(
    source: Path = typer.Argument(..., help="A gist blob (.kv) or, with --method full|rag, a text document."),
    questions: list[str] = typer.Argument(None, help="One or more questions. gist: more blobs (files or store ids) "
                                          "may come first: `ask a.kv b.kv QUESTION` reads both documents' gists."),
    questions_file: Path = typer.Option(None, "--questions", help="A text file with one question per line."),
    method: str = typer.Option("gist", help="gist (answer from a blob: gist or press), full or rag (answer from the "
                                "document)."),
    model: str = typer.Option(None, help="HF model id or local directory; default: the blob's model / embedded default."),
    adapter: str = typer.Option(None, help="A blob: adapter directory; default: the one the blob was made with. full/rag: "
                                 "a LoRA reader (`train --reader full`) merged into the model; default: the shipped "
                                 f"{DEFAULT_READER} (with --model another model: none); 'none': the base model."),
    device: str = typer.Option(None, help="cpu or cuda; default: cuda if available."),
    truncate: bool = typer.Option(False, help="full: cut the document to fit the window instead of failing."),
    index: str = typer.Option(None, help="rag: LanceDB index directory to reuse across calls."),
    chunk_tokens: int = typer.Option(500, help="rag: tokens per chunk."),
    overlap: int = typer.Option(50, help="rag: tokens shared by consecutive chunks."),
    top_k: int = typer.Option(3, help="rag: chunks retrieved per question."),
    embedder: str = typer.Option(None, help="rag: sentence-transformers model path or id; default all-MiniLM-L6-v2."),
    max_new_tokens: int = typer.Option(32, help="Longest answer in tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per question with timings."),
    store: str = typer.Option(None, help="gist: the blob store that document ids are read from (a directory, or "
                              "'default' for the one `gistctl serve` uses); default: the default store."),
) -> None:
    """Answer questions; by default from a gist blob alone. Answers go to stdout, one per question."""
    blob_args: list[str] = []
    rest = list(questions or [])
    if method == "gist":
        blob_args, rest = split_blobs_and_questions([str(source), *rest])
    asked = rest + (read_questions(questions_file) if questions_file else [])
    if not asked:
        raise DataError("give at least one question (arguments or --questions FILE)")
    for question in asked:  # before any model loads
        check_question(question)
    if method == "gist":
        # every blob is read and checked before the model loads: a missing, foreign or modified one fails fast
        paths = [resolve_blob_arg(arg, store) for arg in blob_args]
        blobs = [read_blob(path) for path in paths]
        gc = load_for_blob(blobs[0].meta, model=model, adapter=adapter, device=device)
        state_bytes = sum(path.stat().st_size for path in paths)
        for question in asked:
            _print(gc.ask(blobs, question, max_new_tokens=max_new_tokens), question, method, state_bytes, as_json)
        return
    else:
        rag = {"index_dir": index, "chunk_tokens": chunk_tokens, "overlap": overlap, "top_k": top_k,
               "embedder": embedder}
        runner = open_text_method(method, model=model, device=device, truncate=truncate, rag=rag,
                                  max_new_tokens=max_new_tokens, adapter=reader_for(adapter, model))
        state = runner.prepare(read_document(source))
    for question in asked:
        answer = runner.answer(state, question)
        for warning in runner.warnings or []:
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        runner.warnings = None
        _print(answer, question, method, runner.state_bytes(state), as_json)


def split_blobs_and_questions(args: list[str]) -> tuple[list[str], list[str]]:
    """Leading arguments that name blobs (an existing file, a `.kv` path, a store id), then the questions."""
    blobs = []
    for i, arg in enumerate(args):
        if i == 0 or arg.endswith(".kv") or ID_PATTERN.fullmatch(arg) or _is_file(arg):
            blobs.append(arg)
        else:
            return blobs, args[i:]
    return blobs, []


def _is_file(arg: str) -> bool:
    try:
        return Path(arg).is_file()
    except OSError:  # a question too long to be a file name
        return False


def resolve_blob_arg(arg: str, store: str | None) -> Path:
    """A blob file, or a document id looked up in the store."""
    path = Path(arg)
    if not path.exists() and ID_PATTERN.fullmatch(arg):
        return BlobStore(None if store in (None, "default") else store).blob_path(arg)
    return path


def _print(answer, question: str, method: str, state_bytes: int, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"question": question, "answer": answer.text, "method": method,
                               "ttft_ms": round(answer.ttft_ms, 2),
                               "decode_tokens_per_s": round(answer.decode_tokens_per_s, 2),
                               "prompt_tokens": answer.prompt_tokens, "state_bytes": state_bytes}))
    else:
        typer.echo(answer.text)
