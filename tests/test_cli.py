import json

import pytest
from typer.testing import CliRunner

from gistctl import __version__
from gistctl.cli.main import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("data", "train", "compress", "ask", "bench", "viz-mask", "demo", "serve", "analyze", "adapter"):
        assert command in result.output


@pytest.mark.parametrize("command", ["data", "train", "compress", "ask", "bench", "viz-mask", "demo", "serve",
                                     "analyze misses", "analyze lists", "analyze itemized", "adapter ship"])
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"gistctl {__version__}"


def test_ask_missing_document_is_one_line_exit_2(tmp_path):
    result = runner.invoke(app, ["ask", "--method", "full", str(tmp_path / "nope.txt"), "Q?"])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert "Traceback" not in result.output


def test_ask_full_answers_on_tiny_model(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse is kept by Ada.")
    result = runner.invoke(app, ["ask", "--method", "full", "--model", str(tiny_model_dir), "--max-new-tokens", "3",
                                 str(doc), "Who keeps it?"])
    assert result.exit_code == 0, result.output


def test_ask_unknown_method_exit_2(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    result = runner.invoke(app, ["ask", "--method", "nope", "--model", str(tiny_model_dir), str(doc), "Q?"])
    assert result.exit_code == 2
    assert "unknown method 'nope'" in result.output


def test_ask_rag_reuses_an_index_dir(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse is kept by Ada. " * 40 + "The radio call sign is MRW-7. " + "Gulls fly. " * 40)
    args = ["ask", "--method", "rag", "--model", str(tiny_model_dir), "--index", str(tmp_path / "index"),
            "--chunk-tokens", "64", "--overlap", "8", "--top-k", "2", "--max-new-tokens", "2", "--json",
            str(doc), "What is the call sign?"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    tables = sorted(p.name for p in (tmp_path / "index").iterdir())
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == tables  # same table, not a new one
    assert '"method": "rag"' in first.stdout
