from typer.testing import CliRunner

from gistctl import __version__
from gistctl.cli.main import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("data", "train", "compress", "ask", "bench", "viz-mask"):
        assert command in result.output


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
