import json
import os

import pytest
import yaml

from gistctl.runs import RunDir, atomic_path, atomic_write_text


def test_run_dir_writes_config_and_meta_first(tmp_path):
    run = RunDir.create("train", {"gist": {"num_gist": 3}}, seed=5, argv=["gistctl", "train"])
    assert run.path.parent == tmp_path / "runs"
    assert run.path.name.startswith("train-")
    assert yaml.safe_load(run.file("config.yaml").read_text()) == {"gist": {"num_gist": 3}}
    meta = json.loads(run.file("meta.json").read_text())
    assert meta["seed"] == 5 and meta["command"] == "train" and meta["argv"] == ["gistctl", "train"]
    for key in ("gistctl_version", "python", "torch", "transformers", "device", "git_commit"):
        assert key in meta


def test_explicit_run_dir(tmp_path):
    run = RunDir.create("bench", {}, run_dir=tmp_path / "mine")
    assert run.path == tmp_path / "mine"


def test_atomic_write_leaves_old_file_on_crash(tmp_path):
    target = tmp_path / "blob.bin"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["blob.bin"]  # no temp file left behind


def test_atomic_write_uses_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
