"""`gistctl viz-mask` and the mask picture engine (gistctl.gist.viz)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from typer.testing import CliRunner

from gistctl.cli.main import app
from gistctl.gist.mask import GistLayout
from gistctl.gist.viz import ATTEND, BLOCKED, CELL_COLOURS, FUTURE, PADDING, cell_categories, draw_mask, figure_pixels

runner = CliRunner()
DPI = 50  # small pictures keep the tests fast


def read_png(path: Path) -> np.ndarray:
    """(H, W, 3) uint8."""
    image = matplotlib.image.imread(path)
    return (image[..., :3] * 255).round().astype(np.uint8)


def has_colour(image: np.ndarray, hex_colour: str) -> bool:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
    return bool((image == rgb).all(axis=-1).any())


def invoke(*args: str):
    return runner.invoke(app, ["viz-mask", *args])


def test_png_has_the_right_pixel_size(tmp_path):
    out = tmp_path / "mask.png"
    result = invoke("--num-gist", "25", "--context", "40", "--question", "8", "--answer", "4", "-o", str(out),
                    "--dpi", str(DPI))
    assert result.exit_code == 0, result.output
    assert "K=25, context 40, question 8, answer 4 (77 tokens)" in result.output
    assert str(out) in result.output
    height, width, _ = read_png(out).shape
    assert (width, height) == figure_pixels(1, DPI) == (350, 395)
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]  # the atomic write left no temp file


def test_pixels_differ_between_two_layouts(tmp_path):
    paths = {}
    for name, k in (("k25", "25"), ("k25_again", "25"), ("k10", "10")):
        paths[name] = tmp_path / f"{name}.png"
        result = invoke("--num-gist", k, "--context", "40", "-o", str(paths[name]), "--dpi", str(DPI))
        assert result.exit_code == 0, result.output
    k25, k25_again, k10 = (read_png(paths[n]) for n in ("k25", "k25_again", "k10"))
    assert k25.shape == k10.shape
    assert np.array_equal(k25, k25_again)  # same layout, same picture: the difference below is the layout's
    assert (k25 != k10).any(axis=-1).mean() > 0.01


def test_picture_shows_blocked_cells_only_where_the_gist_rule_blocks(tmp_path):
    # [context][gists] alone: everything earlier is visible, nothing is blocked by the gist rule.
    draw_mask(GistLayout((30,), 5), tmp_path / "prefix.png", dpi=DPI)
    draw_mask(GistLayout((30,), 5, question=6, answer=3), tmp_path / "full.png", dpi=DPI)
    prefix, full = read_png(tmp_path / "prefix.png"), read_png(tmp_path / "full.png")
    blocked = CELL_COLOURS[BLOCKED]
    assert has_colour(full, blocked) and has_colour(full, CELL_COLOURS[ATTEND])
    # The legend swatch carries the colour too; the mask itself must add many more pixels of it.
    count = lambda img: (img == np.array([int(blocked[i : i + 2], 16) for i in (1, 3, 5)])).all(-1).sum()  # noqa: E731
    assert count(full) > 20 * count(prefix) > 0


def test_cell_categories_follow_the_mask_rules():
    layout = GistLayout((4, 3), num_gist=2, question=2, answer=1)  # [c4][g2][c3][g2][q2][a1] = 14
    short = GistLayout((2,), num_gist=2, question=1, answer=1)  # 6 tokens, left-padded by 8
    cells = cell_categories([layout, short])
    assert cells.shape == (2, 14, 14)
    one = cells[0]
    chunk1, gists1, chunk2, gists2, qa = slice(0, 4), slice(4, 6), slice(6, 9), slice(9, 11), slice(11, 14)
    assert (one[qa, chunk1] == BLOCKED).all() and (one[qa, chunk2] == BLOCKED).all()
    assert (one[qa, gists1] == ATTEND).all() and (one[qa, gists2] == ATTEND).all()
    assert (one[chunk2, chunk1] == BLOCKED).all() and (one[chunk2, gists1] == ATTEND).all()
    assert (one[gists1, chunk1] == ATTEND).all()
    assert (one[np.triu_indices(14, k=1)] == FUTURE).all()
    assert not (one == PADDING).any()
    two = cells[1]
    assert (two[:8, :] == PADDING).all() and (two[:, :8] == PADDING).all()
    assert (two[8:, 8:] != PADDING).all()


def test_multi_chunk_from_repeated_and_comma_separated_context(tmp_path):
    out = tmp_path / "chunks.png"
    result = invoke("--num-gist", "5", "--context", "30,20", "--context", "25", "-o", str(out), "--dpi", str(DPI))
    assert result.exit_code == 0, result.output
    assert "K=5, 3 chunks 30+20+25, question 8, answer 4 (102 tokens)" in result.output
    assert out.is_file()


def test_chunk_tokens_splits_a_synthetic_context(tmp_path):
    result = invoke("--context", "50", "--chunk-tokens", "20", "-o", str(tmp_path / "m.png"), "--dpi", str(DPI))
    assert result.exit_code == 0, result.output
    assert "3 chunks 20+20+10" in result.output


def test_default_output_is_a_run_directory(tmp_path):
    result = invoke("--dpi", str(DPI))
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()  # GISTCTL_RUNS points here (conftest)
    assert run.name.startswith("viz-mask-")
    assert {p.name for p in run.iterdir()} == {"config.yaml", "meta.json", "mask.png"}
    assert str(run / "mask.png") in result.output.replace("\n", "")


@pytest.fixture
def examples_file(tmp_path) -> Path:
    records = [
        {"id": "first", "task": "qa", "context": "The lighthouse is kept by Ada. " * 3, "question": "Who keeps it?",
         "answers": ["Ada"], "meta": {}},
        {"id": "second", "task": "qa", "context": "The lamp is red and turns every ten seconds. " * 6,
         "question": "What colour is the lamp?", "answers": ["red"], "meta": {}},
        {"id": "no-answer", "task": "qa", "context": "x", "question": "y", "answers": [], "meta": {}},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    return path


def test_example_draws_the_collated_layout(tiny_model_dir, examples_file, tmp_path):
    out = tmp_path / "example.png"
    result = invoke("--example", f"{examples_file}:2", "--model", str(tiny_model_dir), "--num-gist", "4",
                    "-o", str(out), "--dpi", str(DPI))
    assert result.exit_code == 0, result.output
    assert "data.jsonl:2 (id second): K=4, context" in result.output  # lines count from 1
    height, width, _ = read_png(out).shape
    assert (width, height) == figure_pixels(1, DPI)


def test_examples_draw_a_padded_batch_chunk_by_chunk(tiny_model_dir, examples_file, tmp_path):
    out = tmp_path / "batch.png"
    result = invoke("--example", f"{examples_file}:1", "--example", f"{examples_file}:2", "--model",
                    str(tiny_model_dir), "--chunk-tokens", "16", "-o", str(out), "--dpi", str(DPI))
    assert result.exit_code == 0, result.output
    assert "(id first)" in result.output and "(id second)" in result.output
    assert "chunks 16+16+" in result.output  # contexts longer than 16 tokens are drawn chunk by chunk
    height, width, _ = read_png(out).shape
    assert (width, height) == figure_pixels(2, DPI)


def test_example_longer_than_max_length_is_drawn_truncated(tiny_model_dir, examples_file, tmp_path):
    result = invoke("--example", f"{examples_file}:2", "--model", str(tiny_model_dir), "--max-length", "60",
                    "-o", str(tmp_path / "cut.png"), "--dpi", str(DPI))
    assert result.exit_code == 0, result.output
    assert "context cut by" in result.output and "(60 tokens)" in result.output


@pytest.mark.parametrize("args, message", [
    (["--num-gist", "0"], "--num-gist must be >= 1"),
    (["--context", "abc"], "--context takes token counts"),
    (["--context", "-5"], "--context lengths must be >= 0"),
    (["--question", "-1"], "--question and --answer must be >= 0"),
    (["--output", "mask.jpg"], "use a .png, .svg or .pdf name"),
    (["--max-length", "100"], "only apply with --example"),
    (["--example", "{missing}:1"], "does not exist"),
    (["--example", "{data}:9"], "has 4 lines; line 9 asked for"),
    (["--example", "{data}:0"], "lines are counted from 1"),
    (["--example", "{data}:4"], "is not a JSON object"),
    (["--example", "{data}:3"], "has no answer"),
    (["--example", "{data}:1", "--context", "40"], "takes its lengths from the data"),
])
def test_bad_input_is_one_line_exit_2(args, message, examples_file, tiny_model_dir, tmp_path):
    args = [a.format(missing=tmp_path / "nope.jsonl", data=examples_file) for a in args]
    if "--example" in args:
        args += ["--model", str(tiny_model_dir)]
    output = [] if "--output" in args else ["-o", str(tmp_path / "never.png")]
    result = invoke(*args, *output)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "never.png").exists()


def test_a_large_mask_renders_quickly(tmp_path):
    layout = GistLayout((1024, 1024), num_gist=25, question=30, answer=8)  # 2112 tokens, 4.5M cells
    start = time.perf_counter()
    draw_mask(layout, tmp_path / "large.png", dpi=DPI)
    assert time.perf_counter() - start < 20
    assert read_png(tmp_path / "large.png").shape[:2] == figure_pixels(1, DPI)[::-1]
