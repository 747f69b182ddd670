"""`gistctl demo`: the sections a user sees (not the numbers)."""

import json

import pytest
from typer.testing import CliRunner

from gistctl.cli.main import app


def _check_sections(result, run_dir):
    assert result.exit_code == 0, result.output
    for section in ("Document", "tokens", "Answers", "from the gist blob alone", "from the press blob alone", "full", "rag",
                    "What each method keeps", "gist KV blob on disk", "x smaller", "mean TTFT"):
        assert section in result.output, section
    saved = json.loads((run_dir / "demo.json").read_text())
    assert set(saved["answers"]) == {"gist", "press", "full", "rag"}
    assert all(len(v) == len(saved["questions"]) for v in saved["answers"].values())
    assert (run_dir / "document.kv").is_file() and (run_dir / f"document-{saved['press']}.kv").is_file()
    # the press blob holds about (1 - ratio) of the document's entries, and is smaller than the whole cache
    assert abs(saved["press_kept_fraction"] - (1 - saved["ratio"])) < 0.05
    assert saved["state_bytes"]["press"] < saved["full_kv_bytes"]
    return saved


def test_demo_sections_on_the_tiny_model(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("Ada keeps the lighthouse. The call sign is MRW-7. " * 5)
    result = CliRunner().invoke(app, ["demo", "--model", str(tiny_model_dir), "--adapter", "none", "--gist", "2",
                                      "--document", str(doc), "-q", "Who keeps it?", "--run-dir",
                                      str(tmp_path / "run")])
    _check_sections(result, tmp_path / "run")


def test_demo_ratio_is_the_ratio_compress_prints(tiny_model_dir, tmp_path):
    """Like for like: the demo's "x smaller" compares the blob with the full KV at the blob's dtype, as compress."""
    import re

    doc = tmp_path / "doc.txt"
    doc.write_text("Ada keeps the lighthouse. The call sign is MRW-7. " * 5)
    model = ["--model", str(tiny_model_dir), "--adapter", "none", "--num-gist", "2"]
    compressed = CliRunner().invoke(app, ["compress", str(doc), "-o", str(tmp_path / "doc.kv"), *model])
    assert compressed.exit_code == 0, compressed.output
    ratio = re.search(r"ratio\s+([\d.]+)x smaller", compressed.output).group(1)
    result = CliRunner().invoke(app, ["demo", *model, "--document", str(doc), "-q", "Who?", "--run-dir",
                                      str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "demo.json").read_text())
    assert saved["full_kv_dtype"] == "fp16"
    assert f"{saved['full_kv_bytes'] / saved['state_bytes']['gist']:.1f}" == ratio
    gist_row = next(line for line in result.output.splitlines() if "gist KV blob on disk" in line)
    assert f"{ratio}x smaller" in gist_row


@pytest.mark.slow
def test_demo_on_the_default_model_and_adapter(tmp_path):
    from gistctl.gist.adapter import DEFAULT_ADAPTER, SHIPPED_ADAPTERS

    if not (SHIPPED_ADAPTERS / DEFAULT_ADAPTER).is_dir():
        pytest.fail("the default adapter is not shipped")
    result = CliRunner().invoke(app, ["demo", "--run-dir", str(tmp_path / "run")])
    saved = _check_sections(result, tmp_path / "run")
    assert saved["reader"] == "full-reader"  # the shipped reader by default for the press, full and rag
