"""The training loop on the tiny model: learning, resume, accumulation, DDP, what it leaves on disk."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gistctl.config import load_config
from gistctl.data.schema import write_jsonl
from gistctl.train.checkpoint import CHECKPOINT_FILES, STATE_FILE
from gistctl.train.lora import GIST_ROWS_KEY
from gistctl.train.loop import TrainingError, train

KEYS = ["7K2P9A", "Q4M8ZT", "B3X7RN", "H9C2LW"]


def passkey_records(n=4):
    records = []
    for i in range(n):
        key = KEYS[i % len(KEYS)]
        context = f"The grass is green. The pass key is {key}. Remember it. The sky is blue. " * 2
        records.append({"id": f"pk-{i}", "task": "passkey", "context": context, "question": "What is the pass key?",
                        "answers": [key], "meta": {"seed": i, "source": "test"}})
    return records


def lora_model_that_matters(model_dir):
    """(loaded, gist model, LoRA-wrapped model) on the tiny model, K=2, with LoRA B drawn non-zero (it starts at
    zero) so that the adapter changes the forward pass."""
    from gistctl.config import LoraSettings
    from gistctl.gist.model import load_gist_model
    from gistctl.train.lora import wrap_with_lora
    from gistctl.models import load_model

    loaded = load_model(str(model_dir), device="cpu")
    gm = load_gist_model(loaded, None, num_gist=2)
    torch.manual_seed(0)
    model = wrap_with_lora(gm.model, gm.gist_ids, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return loaded, gm, model


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, passkey_records())
    return path


def settings(model_dir, data, **train):
    base = {"model.name": str(model_dir), "model.device": "cpu", "gist.num_gist": 2, "train.data": str(data),
            "train.batch_size": 2, "train.max_steps": 10, "train.warmup_steps": 2, "train.lr": 1e-2,
            "train.gist_lr": 1e-2, "train.save_every": 5, "train.bf16": False, "lora.r": 4, "lora.alpha": 8}
    base.update({f"train.{k}": v for k, v in train.items()})
    return load_config(None, base)


def test_overfit_one_batch_then_answer_from_blob(tiny_model_dir, tmp_path):
    data = tmp_path / "two.jsonl"
    records = passkey_records(2)  # one batch: same question, two keys -> only the gists can tell them apart
    write_jsonl(data, records)
    config = settings(tiny_model_dir, data, batch_size=2, max_steps=80)
    result = train(config, tmp_path / "run", overfit_steps=80, overfit_threshold=0.2)
    assert result.losses[-1] < 0.1 * result.losses[0]  # loss fell by more than 90%
    from gistctl.gist.model import load_gist_model
    from gistctl.kv.answer import answer_from_blob
    from gistctl.kv.compress import compress_document
    from gistctl.models import load_model

    gm = load_gist_model(load_model(str(tiny_model_dir), device="cpu"), result.final_dir)
    for record in records:
        blob, _ = compress_document(gm, record["context"], dtype="fp32")
        assert answer_from_blob(gm, blob, record["question"], max_new_tokens=8).text == record["answers"][0]


def test_overfit_check_fails_loudly(tiny_model_dir, data_file, tmp_path):
    config = settings(tiny_model_dir, data_file, lr=1e-9, gist_lr=1e-9, warmup_steps=0)
    with pytest.raises(TrainingError, match="overfit check failed"):
        train(config, tmp_path / "run", overfit_steps=3, overfit_threshold=0.01)


def test_resume_equals_straight_run(tiny_model_dir, data_file, tmp_path):
    straight = train(settings(tiny_model_dir, data_file), tmp_path / "straight")
    first = train(settings(tiny_model_dir, data_file), tmp_path / "split", stop_after=5)
    assert first.final_dir is None and (tmp_path / "split" / "step-000005" / STATE_FILE).is_file()
    second = train(settings(tiny_model_dir, data_file), tmp_path / "split", resume=True)
    assert second.steps == 10
    assert abs(second.last_loss - straight.last_loss) < 1e-5
    logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 11))  # one line per step, none duplicated by the resume
    a = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_gradient_accumulation_matches_big_batch(tiny_model_dir, data_file, tmp_path):
    big = train(settings(tiny_model_dir, data_file, batch_size=4, max_steps=1, warmup_steps=0), tmp_path / "big")
    acc = train(settings(tiny_model_dir, data_file, batch_size=2, grad_accum=2, max_steps=1, warmup_steps=0),
                tmp_path / "acc")
    a = load_file(str(big.final_dir / "adapter_model.safetensors"))
    b = load_file(str(acc.final_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert abs(big.last_loss - acc.last_loss) < 1e-5


def test_checkpoint_files_and_frozen_weights(tiny_model_dir, data_file, tmp_path, monkeypatch):
    import gistctl.train.loop as loop

    # the base weights as training got them (after the gist rows were added), compared with the same tensors
    # after training, in this process: LoRA and the gist rows train, nothing of the base model moves
    seen = {}
    real_wrap = loop.wrap_with_lora

    def wrap_and_remember(model, gist_ids, settings):
        seen["before"] = [(name, param, param.detach().clone()) for name, param in model.named_parameters()]
        seen["model"] = real_wrap(model, gist_ids, settings)
        return seen["model"]

    monkeypatch.setattr(loop, "wrap_with_lora", wrap_and_remember)
    run = tmp_path / "run"
    result = train(settings(tiny_model_dir, data_file, max_steps=6, save_every=3), run)
    for name in ("step-000003", "final"):
        files = set(os.listdir(run / name))
        assert set(CHECKPOINT_FILES) <= files
        assert (STATE_FILE in files) == name.startswith("step-")
        assert not [f for f in files if f.startswith(".")]
    assert not [p for p in os.listdir(run) if p.startswith(".")]  # no half-written checkpoint left
    meta = json.loads((run / "final" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["seed"] == 0 and meta["data"]["train"]["sha256"]
    # PEFT keeps target_modules as a set, in an order that changes with each process's string hashing; the
    # fingerprint hashes this file, so it is written sorted (same weights, same fingerprint, in any process)
    lora_config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert lora_config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(seen["before"]) > 10
    moved = [name for name, param, before in seen["before"] if not torch.equal(param.detach(), before)]
    assert moved == []
    trained = {name: param for name, param in seen["model"].named_parameters() if param.requires_grad}
    assert any("lora_" in name for name in trained) and any(GIST_ROWS_KEY in name for name in trained)
    assert all("lora_" in name or GIST_ROWS_KEY in name for name in trained)
    # the adapter on disk holds the gist rows training moved away from their mean initialisation
    from gistctl.gist.model import load_gist_model
    from gistctl.models import load_model

    base = load_model(str(tiny_model_dir), device="cpu")
    base_embed = base.model.get_input_embeddings().weight.detach().clone()
    gm = load_gist_model(load_model(str(tiny_model_dir), device="cpu"), result.final_dir, merge=False)
    embed = gm.model.get_input_embeddings()(torch.arange(base_embed.shape[0])[None])[0]
    assert torch.equal(embed, base_embed)
    gist_rows = gm.model.get_input_embeddings()(torch.tensor([gm.gist_ids]))[0]
    assert not torch.allclose(gist_rows, base_embed.mean(dim=0).expand_as(gist_rows))  # gist rows trained


def test_eval_from_compressed_kv_keeps_best(tiny_model_dir, data_file, tmp_path):
    config = settings(tiny_model_dir, data_file, max_steps=4, eval_every=2, eval_limit=2)
    config.train.eval = str(data_file)
    train(config, tmp_path / "run")
    evals = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert set(evals[0]["eval"]["per_task"]) == {"passkey"} and evals[0]["eval"]["n"] == 2
    best = json.loads((tmp_path / "run" / "best" / "meta.json").read_text())
    assert best["best_eval"]["overall"] == max(r["eval"]["overall"] for r in evals)


def test_two_process_cpu_run(tiny_model_dir, data_file, tmp_path):
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gistctl", "train",
               "--model", str(tiny_model_dir), "--data", str(data_file), "--num-gist", "2", "--max-steps", "3",
               "--batch-size", "1", "--device", "cpu", "--run-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert [p for p in os.listdir(run) if p == "final"] == ["final"]


def test_sigterm_saves_a_checkpoint_that_resumes(tiny_model_dir, data_file, tmp_path):
    import signal
    import time

    run = tmp_path / "bg"
    command = [sys.executable, "-m", "gistctl", "train", "--model", str(tiny_model_dir), "--data", str(data_file),
               "--num-gist", "2", "--max-steps", "100000", "--batch-size", "1", "--device", "cpu", "--run-dir", str(run)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr
    (checkpoint,) = [p for p in run.iterdir() if p.name.startswith("step-")]
    assert (checkpoint / STATE_FILE).is_file()
    steps = int(checkpoint.name.split("-")[1])
    assert steps >= 3
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] in (steps - 1, steps)  # a signal between the update and its log line leaves one unlogged


def test_init_adapter_starts_from_another_run(tiny_model_dir, data_file, tmp_path):
    first = train(settings(tiny_model_dir, data_file, max_steps=3), tmp_path / "phase1")
    config = settings(tiny_model_dir, data_file, max_steps=1, lr=1e-12, gist_lr=1e-12, warmup_steps=0)
    config.train.init_adapter = str(first.final_dir)
    second = train(config, tmp_path / "phase2")
    a = load_file(str(first.final_dir / "adapter_model.safetensors"))
    b = load_file(str(second.final_dir / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # a ~zero-lr step keeps the phase-1 weights
    fresh = load_file(str(train(settings(tiny_model_dir, data_file, max_steps=1, lr=1e-12, gist_lr=1e-12,
                                         warmup_steps=0), tmp_path / "fresh").final_dir / "adapter_model.safetensors"))
    assert not all(torch.allclose(a[k], fresh[k], atol=1e-6) for k in a)
    bad = settings(tiny_model_dir, data_file, max_steps=1)
    bad.gist.num_gist = 3
    bad.train.init_adapter = str(first.final_dir)
    from gistctl.errors import ConfigError

    with pytest.raises(ConfigError, match="K=2"):
        train(bad, tmp_path / "bad")


def test_init_adapter_widens_k_by_repeating_each_gist_row(tiny_model_dir, data_file, tmp_path):
    from gistctl.train.lora import GIST_ROWS_KEY

    first = train(settings(tiny_model_dir, data_file, max_steps=3), tmp_path / "k2")
    wide = settings(tiny_model_dir, data_file, max_steps=1, lr=1e-12, gist_lr=1e-12, warmup_steps=0)
    wide.gist.num_gist = 4
    wide.train.init_adapter = str(first.final_dir)
    second = train(wide, tmp_path / "k4")
    a = load_file(str(first.final_dir / "adapter_model.safetensors"))
    b = load_file(str(second.final_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    rows = [k for k in a if k.endswith(GIST_ROWS_KEY)]
    assert len(rows) == 1 and a[rows[0]].shape[0] == 2 and b[rows[0]].shape[0] == 4
    assert not torch.allclose(a[rows[0]][0], a[rows[0]][1])  # two different trained rows...
    assert torch.allclose(b[rows[0]], a[rows[0]].repeat_interleave(2, dim=0), atol=1e-6)  # ...each kept twice
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if k not in rows)  # LoRA weights as they were


def test_init_adapter_into_more_lora_modules_starts_exactly_where_it_left_off(tiny_model_dir, data_file, tmp_path):
    """Warm start into a config that adds LoRA on the MLP: the adapter's weights load as they are and the new
    modules start at zero, so the first step's loss is the loss of continuing with the old modules alone."""
    first = train(settings(tiny_model_dir, data_file, max_steps=3), tmp_path / "attn")
    runs = {}
    for name, modules in (("same", None), ("mlp", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])):
        config = settings(tiny_model_dir, data_file, max_steps=1, lr=1e-12, gist_lr=1e-12, warmup_steps=0)
        config.train.init_adapter = str(first.final_dir)
        if modules:
            config.lora.target_modules = modules
        runs[name] = train(config, tmp_path / name)
    assert runs["mlp"].losses[0] == pytest.approx(runs["same"].losses[0], rel=1e-5)
    assert runs["same"].losses[0] < 0.9 * first.losses[0]  # the warm start is not from scratch
    a = load_file(str(first.final_dir / "adapter_model.safetensors"))
    b = load_file(str(runs["mlp"].final_dir / "adapter_model.safetensors"))
    assert set(a) < set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any("mlp" in k for k in set(b) - set(a))


def test_ship_adapter_writes_a_self_describing_copy(tiny_model_dir, data_file, tmp_path):
    from gistctl.gist.adapter import adapter_fingerprint
    from gistctl.gist.model import load_gist_model
    from gistctl.models import load_model
    from gistctl.train.ship import ship_adapter

    final = train(settings(tiny_model_dir, data_file, max_steps=2), tmp_path / "run").final_dir
    shipped = ship_adapter(final, "mine", note="test", target_root=tmp_path / "adapters")
    meta = json.loads((shipped / "meta.json").read_text())
    assert meta["adapter_fingerprint"] == adapter_fingerprint(shipped) == adapter_fingerprint(final)
    assert meta["step"] == 2 and meta["recipe"]["gist"]["num_gist"] == 2 and meta["note"] == "test"
    assert STATE_FILE not in os.listdir(shipped)
    load_gist_model(load_model(str(tiny_model_dir), device="cpu"), shipped)  # loads as an adapter
    rechunked = ship_adapter(final, "long", chunk_tokens=64, target_root=tmp_path / "adapters")
    gm = load_gist_model(load_model(str(tiny_model_dir), device="cpu"), rechunked)
    assert gm.chunk_tokens == 64 and json.loads((rechunked / "meta.json").read_text())["chunk_tokens"] == \
        {"trained": json.loads((final / "gist.json").read_text())["chunk_tokens"], "shipped": 64}


def curriculum_config(tmp_path, model_dir, **overrides):
    import yaml

    recipe = {"train": {"n": 6, "seed": 1}, "eval": {"n": 2, "seed": 2}, "haystack_dir": None,
              "components": [{"task": "passkey", "weight": 1, "tokens": "100..140", "options": {"key_format": "digits5"}}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    config = {"model": {"name": str(model_dir), "device": "cpu"}, "gist": {"num_gist": 2},
              "lora": {"r": 4, "alpha": 8},
              "train": {"batch_size": 2, "lr": 1e-2, "gist_lr": 1e-2, "warmup_steps": 0, "bf16": False,
                        "save_every": 1, "eval_every": 2, "eval_limit": 2},
              "phases": [{"name": "first", "recipe": str(tmp_path / "recipe.yaml"), "train": {"max_steps": 2}},
                         {"name": "second", "recipe": str(tmp_path / "recipe.yaml"),
                          "train": {"max_steps": 2, "lr": 5e-3}, "gist": {"chunk_tokens": 96}}]}
    config.update(overrides)
    (tmp_path / "curriculum.yaml").write_text(yaml.safe_dump(config))
    return load_config(tmp_path / "curriculum.yaml")


def test_curriculum_chains_phases_and_resumes_across_sittings(tiny_model_dir, tmp_path):
    from gistctl.config import config_from_dict
    from gistctl.train.curriculum import train_curriculum

    config = curriculum_config(tmp_path, tiny_model_dir)
    assert config.total_steps() == 4 and config_from_dict(config.to_dict()) == config
    straight = train_curriculum(config, tmp_path / "straight")
    logged = []
    first = train_curriculum(config, tmp_path / "split", stop_after=3, on_log=logged.append)
    assert first.final_dir is None and (tmp_path / "split" / "first" / "final").is_dir()
    assert not (tmp_path / "split" / "final").exists()
    before = (tmp_path / "split" / "first" / "final" / "adapter_model.safetensors").read_bytes()
    second = train_curriculum(config, tmp_path / "split", on_log=logged.append)
    assert [(r["phase"], r["phase_step"], r["step"]) for r in logged] == [
        ("first", 1, 1), ("first", 2, 2), ("second", 1, 3), ("second", 2, 4)]  # the finished phase is skipped
    assert (tmp_path / "split" / "first" / "final" / "adapter_model.safetensors").read_bytes() == before
    phase2 = load_config(tmp_path / "split" / "second" / "config.yaml")
    assert phase2.train.init_adapter == str(tmp_path / "split" / "first" / "final") and phase2.train.lr == 5e-3
    phase1 = load_config(tmp_path / "split" / "first" / "config.yaml")
    assert (phase1.gist.chunk_tokens, phase2.gist.chunk_tokens) == (1024, 96)  # 100-140-token documents: 1 chunk, 2
    assert phase2.train.data == str(tmp_path / "split" / "data" / "second" / "train.jsonl")
    a = load_file(str(straight.final_dir / "adapter_model.safetensors"))
    b = load_file(str(second.final_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # two sittings == one
    meta = json.loads((second.final_dir / "meta.json").read_text())
    assert meta["step"] == 4 and [p["name"] for p in meta["phases"]] == ["first", "second"]
    assert all(p["steps"] == 2 and p["evals"] and p["data"]["train"]["examples"] == 6 for p in meta["phases"])
    assert load_config(second.final_dir / "config.yaml").phases == config.phases
    assert [p["gist"] for p in meta["phases"]] == [{}, {"chunk_tokens": 96}]
    assert json.loads((second.final_dir / "gist.json").read_text())["chunk_tokens"] == 96  # the last phase's


def test_a_continuation_ships_as_one_curriculum_that_reproduces_it(tiny_model_dir, tmp_path):
    """A curriculum started from a shipped adapter, shipped `after` it: meta.json's recipe is the shipped
    adapter's phases, then the run's with the settings they changed; training that recipe from scratch gives
    the same weights."""
    import yaml

    from gistctl.config import config_from_dict
    from gistctl.errors import ConfigError
    from gistctl.train.curriculum import train_curriculum
    from gistctl.train.ship import ship_adapter

    first = curriculum_config(tmp_path, tiny_model_dir, phases=[
        {"name": "first", "recipe": str(tmp_path / "recipe.yaml"), "train": {"max_steps": 2}}])
    adapters = tmp_path / "adapters"
    base = ship_adapter(train_curriculum(first, tmp_path / "base").final_dir, "base", target_root=adapters)
    more = first.to_dict()
    more["train"].update(init_adapter=str(base), lr=5e-3, grad_chunks="answer")
    more["gist"]["positions"] = "auto"
    more["phases"] = [{"name": "more", "recipe": str(tmp_path / "recipe.yaml"), "train": {"max_steps": 3},
                       "gist": {"chunk_tokens": 96}}]
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(more))
    run = train_curriculum(load_config(tmp_path / "more.yaml"), tmp_path / "more")
    shipped = ship_adapter(run.final_dir, "base", after=base, target_root=adapters)  # replaces what it continues
    meta = json.loads((shipped / "meta.json").read_text())
    assert meta["step"] == 5 and [p["name"] for p in meta["phases"]] == ["first", "more"]
    assert meta["continues"]["step"] == 2 and meta["continues"]["adapter_fingerprint"] != meta["adapter_fingerprint"]
    recipe = config_from_dict(meta["recipe"])
    assert yaml.safe_load((shipped / "config.yaml").read_text()) == meta["recipe"]
    assert recipe.train.init_adapter is None and recipe.phases[0] == first.phases[0]
    assert recipe.phases[1].train == meta["phases"][1]["train"] == {"max_steps": 3, "lr": 5e-3, "grad_chunks": "answer"}
    assert recipe.phases[1].gist == meta["phases"][1]["gist"] == {"chunk_tokens": 96, "positions": "auto"}
    scratch = train_curriculum(recipe, tmp_path / "scratch").final_dir
    a = load_file(str(scratch / "adapter_model.safetensors"))
    b = load_file(str(shipped / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="final/"):
        ship_adapter(tmp_path / "more" / "more" / "final", "other", after=shipped, target_root=adapters)


def test_curriculum_config_errors(tiny_model_dir, tmp_path):
    from gistctl.errors import ConfigError

    with pytest.raises(ConfigError, match="phases.first.train.data"):
        curriculum_config(tmp_path, tiny_model_dir, phases=[
            {"name": "first", "recipe": str(tmp_path / "recipe.yaml"), "train": {"data": "x.jsonl"}}])
    with pytest.raises(ConfigError, match="unique"):
        curriculum_config(tmp_path, tiny_model_dir, phases=[{"name": "a", "recipe": str(tmp_path / "recipe.yaml")}] * 2)
    with pytest.raises(ConfigError, match="does not exist"):
        curriculum_config(tmp_path, tiny_model_dir, phases=[{"name": "a", "recipe": str(tmp_path / "none.yaml")}])
    with pytest.raises(ConfigError, match="phases.a.gist.num_gist"):  # gist rows carry over: K is fixed
        curriculum_config(tmp_path, tiny_model_dir, phases=[
            {"name": "a", "recipe": str(tmp_path / "recipe.yaml"), "gist": {"num_gist": 4}}])


def test_stop_at_step_finishes_part_way_through_the_schedule(tiny_model_dir, data_file, tmp_path):
    """stop_at_step: final/ at that step of a warmup + cosine that spans max_steps, the same weights as the
    step checkpoint of the full-length run, not those of a run whose schedule ends there."""
    from gistctl.errors import ConfigError

    part = train(settings(tiny_model_dir, data_file, max_steps=6, stop_at_step=4, save_every=1000), tmp_path / "part")
    train(settings(tiny_model_dir, data_file, max_steps=6, save_every=4), tmp_path / "full")
    short = train(settings(tiny_model_dir, data_file, max_steps=4, save_every=1000), tmp_path / "short")  # lr decays sooner
    assert part.steps == 4 and json.loads((part.final_dir / "meta.json").read_text())["step"] == 4
    a = load_file(str(part.final_dir / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "full" / "step-000004" / "adapter_model.safetensors"))
    c = load_file(str(short.final_dir / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ConfigError, match="stop_at_step"):
        settings(tiny_model_dir, data_file, max_steps=6, stop_at_step=7)
    with pytest.raises(ConfigError, match="phases.a: stop_at_step"):
        curriculum_config(tmp_path, tiny_model_dir, phases=[
            {"name": "a", "recipe": str(tmp_path / "recipe.yaml"), "train": {"max_steps": 2, "stop_at_step": 3}}])
    config = curriculum_config(tmp_path, tiny_model_dir, phases=[
        {"name": "a", "recipe": str(tmp_path / "recipe.yaml"), "train": {"max_steps": 4, "stop_at_step": 3}},
        {"name": "b", "recipe": str(tmp_path / "recipe.yaml"), "train": {"max_steps": 2}}])
    assert config.total_steps() == 5


def test_stop_at_eval_finishes_a_run_once_it_has_learned(tiny_model_dir, tmp_path):
    data = tmp_path / "two.jsonl"
    write_jsonl(data, passkey_records(2))  # learnable in well under 200 steps (see the overfit test)
    config = settings(tiny_model_dir, data, batch_size=2, max_steps=150, eval_every=10, eval_limit=2,
                      save_every=1000, stop_at_eval=0.5, eval=str(data))
    result = train(config, tmp_path / "run")
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval" in r]
    assert result.final_dir is not None and result.steps < 150 and result.steps == evals[-1]["step"]
    assert evals[-1]["eval"]["overall"] >= 0.5 and "stopped_early" in evals[-1]
    assert all(r["eval"]["overall"] < 0.5 for r in evals[:-1])
    assert json.loads((result.final_dir / "meta.json").read_text())["step"] == result.steps
    with pytest.raises(Exception, match="stop_at_eval"):
        settings(tiny_model_dir, data, stop_at_eval=1.5, eval=str(data))
    with pytest.raises(Exception, match="needs train.eval"):
        settings(tiny_model_dir, data, stop_at_eval=0.5)


@pytest.mark.parametrize("chunk_tokens", [1024, 8])  # one chunk; several
def test_chunk_by_chunk_loss_equals_the_masked_batch_loss(tiny_model_dir, chunk_tokens):
    """Training through compress's own read (`read_chunks`) under the sequential layout is the masked
    forward computed another way: same loss, same gradients. The compact layout agrees on one chunk (RoPE
    sees the same distances) and differs once there are several."""
    from gistctl.gist.collate import GistCollator, collate_encoded
    from gistctl.gist.forward import chunked_answer_loss_sum
    from gistctl.train.loop import answer_loss_sum

    loaded, gm, model = lora_model_that_matters(tiny_model_dir)
    # float64: the two computations sum in different orders; in fp32 the gradients (of a loss summed over
    # ~200 answer tokens) differ by up to ~2e-4 on an AVX-512 CPU, in float64 by ~1e-14
    model.double()
    collator = GistCollator(loaded.tokenizer, gm.gist_ids, 512, chunk_tokens)
    encoded = [collator.encode(r) for r in passkey_records(3)]
    chunk_counts = {len(e.layout.chunks) for e in encoded}
    assert chunk_counts == {1} if chunk_tokens == 1024 else min(chunk_counts) > 2

    def loss_and_grads(compute):
        model.zero_grad()
        loss, count = compute()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return float(loss), count, grads

    masked = loss_and_grads(lambda: answer_loss_sum(model, collate_encoded(encoded, loaded.tokenizer.pad_token_id)))
    sequential = loss_and_grads(lambda: chunked_answer_loss_sum(model, encoded, gm.gist_ids, "sequential"))
    compact = loss_and_grads(lambda: chunked_answer_loss_sum(model, encoded, gm.gist_ids, "compact"))
    assert masked[1] == sequential[1] == compact[1] == sum(e.layout.answer for e in encoded)
    assert sequential[0] == pytest.approx(masked[0], rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-10, rtol=1e-8) for a, b in zip(masked[2], sequential[2]))
    if chunk_tokens == 1024:
        assert compact[0] == pytest.approx(masked[0], rel=1e-4)
    else:
        assert compact[0] != pytest.approx(masked[0], rel=1e-3)


def test_auto_layout_loss_reads_each_example_in_the_layout_compress_chooses(tiny_model_dir):
    """gist.positions: auto trains each example as compress reads it: documents of up to
    AUTO_SEQUENTIAL_CHUNKS chunks sequentially, longer ones compact, in one batch; loss and gradients are the
    sum of the two concrete layouts' over their examples, and differ from reading the short ones compact too."""
    from gistctl.gist.collate import GistCollator
    from gistctl.gist.forward import chunked_answer_loss_sum
    from gistctl.gist.positions import AUTO_SEQUENTIAL_CHUNKS

    loaded, gm, model = lora_model_that_matters(tiny_model_dir)
    collator = GistCollator(loaded.tokenizer, gm.gist_ids, 512, 8)
    records = passkey_records(2) + [{"context": f"The pass key is {key}.", "question": "What is the pass key?",
                                     "answers": [key]} for key in KEYS[:2]]
    encoded = [collator.encode(r) for r in records]
    short = [e for e in encoded if len(e.layout.chunks) == AUTO_SEQUENTIAL_CHUNKS]
    long = [e for e in encoded if len(e.layout.chunks) > AUTO_SEQUENTIAL_CHUNKS]
    assert len(short) == len(long) == 2

    def loss_and_grads(parts):
        model.zero_grad()
        total = sum(chunked_answer_loss_sum(model, examples, gm.gist_ids, layout)[0] for examples, layout in parts)
        total.backward()
        return float(total), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    auto = loss_and_grads([(encoded, "auto")])
    split = loss_and_grads([(short, "sequential"), (long, "compact")])
    all_compact = loss_and_grads([(encoded, "compact")])
    assert auto[0] == pytest.approx(split[0], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(auto[1], split[1]))
    assert auto[0] != pytest.approx(all_compact[0], rel=1e-4)


def test_compact_training_answers_from_compact_blobs(tiny_model_dir, tmp_path):
    """gist.positions: compact trains through the chunk-by-chunk read, records the layout in gist.json, and
    the adapter then answers several-chunk documents from compact blobs."""
    from gistctl.gist.adapter import read_adapter_meta
    from gistctl.gist.model import load_gist_model
    from gistctl.kv.answer import answer_from_blob
    from gistctl.kv.compress import compress_document
    from gistctl.models import load_model

    data = tmp_path / "two.jsonl"
    records = passkey_records(2)
    write_jsonl(data, records)
    config = settings(tiny_model_dir, data, batch_size=2, max_steps=80)
    config.gist.chunk_tokens, config.gist.positions = 12, "compact"
    result = train(config, tmp_path / "run", overfit_steps=80, overfit_threshold=0.2)
    assert result.losses[-1] < 0.1 * result.losses[0]
    assert read_adapter_meta(result.final_dir).positions == "compact"
    gm = load_gist_model(load_model(str(tiny_model_dir), device="cpu"), result.final_dir)
    for record in records:
        blob, _ = compress_document(gm, record["context"], dtype="fp32")
        assert blob.meta.positions == "compact" and blob.meta.num_chunks > 2
        assert answer_from_blob(gm, blob, record["question"], max_new_tokens=8).text == record["answers"][0]


def test_bf16_autocast_only_where_bf16_is_native(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """train.bf16 asks for bf16 autocast; on a device where bf16 is emulated (an AVX2 CPU: several times
    slower than fp32) training runs in fp32 instead, and says so in metrics.jsonl."""
    import gistctl.train.loop as loop

    def run(name, native, bf16):
        monkeypatch.setattr(loop, "bf16_is_native", lambda device: native)
        result = train(settings(tiny_model_dir, data_file, max_steps=1, bf16=bf16), tmp_path / name)
        record = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        return result.last_loss, record["bf16"]

    fp32_loss, fp32_flag = run("fp32", True, False)
    emulated_loss, emulated_flag = run("emulated", False, True)
    native_loss, native_flag = run("native", True, True)
    assert (fp32_flag, emulated_flag, native_flag) == (False, False, True)
    assert emulated_loss == fp32_loss  # bit-identical: no autocast
    assert native_loss != fp32_loss  # autocast really changes the arithmetic


def test_answer_chunks_are_the_chunks_whose_text_holds_the_answer(tiny_model_dir):
    from gistctl.gist.collate import answer_chunks
    from gistctl.models import load_model

    tokenizer = load_model(str(tiny_model_dir), device="cpu").tokenizer
    text = "The grass is green. " * 6 + "The pass key is QX7R2B. " + "The sky is blue. " * 6
    ids = tokenizer(text, add_special_tokens=False).input_ids
    chunks = [ids[i : i + 10] for i in range(0, len(ids), 10)]
    found = answer_chunks(tokenizer, chunks, "QX7R2B")
    assert found and all(found[i] + 1 == found[i + 1] for i in range(len(found) - 1))  # one run of chunks
    assert "QX7R2B" in "".join(tokenizer.decode(chunks[i]) for i in found)
    assert all("QX7R2B" not in tokenizer.decode(chunks[i]) for i in range(len(chunks)) if i not in found)
    # a key split over a chunk boundary names both chunks
    at = len(tokenizer(text[: text.index("QX7R2B") + 3], add_special_tokens=False).input_ids)
    split = [ids[:at], ids[at:]]
    assert tokenizer.decode(split[0]).endswith("QX7") and tokenizer.decode(split[1]).startswith("R2B")
    assert answer_chunks(tokenizer, split, "QX7R2B") == (0, 1)
    assert answer_chunks(tokenizer, chunks, "green, blue") == ()  # not verbatim in the text


def test_grad_chunks_copied_looks_up_answer_chunks_only_for_answers_copied_from_the_text(tiny_model_dir):
    """A count "3" found in "house number 23" is a coincidence: with answer_chunks_for (grad_chunks: copied)
    an aggregate example reads every chunk with gradients, a passkey still only its answer's chunk."""
    from gistctl.data.schema import COPIED_TASKS
    from gistctl.gist.collate import GistCollator
    from gistctl.models import load_model

    loaded = load_model(str(tiny_model_dir), device="cpu")
    context = "The grass is green. " * 5 + "The door of house number 23 is painted red. " + "The sky is blue. " * 5
    count = {"task": "aggregate", "context": context, "question": "How many doors are red?", "answers": ["3"]}
    key = {**count, "task": "passkey", "context": context.replace("23", "QX7R2B"), "answers": ["QX7R2B"]}
    every_task = GistCollator(loaded.tokenizer, [0, 1], 512, 8)
    copied = GistCollator(loaded.tokenizer, [0, 1], 512, 8, answer_chunks_for=COPIED_TASKS)
    assert 0 < len(every_task.encode(count).answer_chunks) < len(every_task.encode(count).layout.chunks)
    assert copied.encode(count).answer_chunks == ()  # () reads every chunk with gradients
    assert copied.encode(key).answer_chunks == every_task.encode(key).answer_chunks != ()


def test_answer_chunks_only_reads_the_other_chunks_without_gradients(tiny_model_dir):
    """train.grad_chunks: answer: the loss is the compact loss, but only the chunks holding the answer
    are read with gradients (the rest under no_grad), so the gradient differs from the full one."""
    from gistctl.gist.collate import GistCollator
    from gistctl.gist.forward import chunked_answer_loss_sum

    loaded, gm, model = lora_model_that_matters(tiny_model_dir)
    record = {"context": "The grass is green. " * 5 + "The pass key is QX7R2B. " + "The sky is blue. " * 5,
              "question": "What is the pass key?", "answers": ["QX7R2B"]}
    example = GistCollator(loaded.tokenizer, gm.gist_ids, 512, 8).encode(record)
    chunks = len(example.layout.chunks)
    assert chunks > 3 and 0 < len(example.answer_chunks) < chunks

    grad_enabled: list[bool] = []
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: grad_enabled.append(torch.is_grad_enabled()))

    def loss_and_grads(**kwargs):
        model.zero_grad()
        grad_enabled.clear()
        loss, _ = chunked_answer_loss_sum(model, [example], gm.gist_ids, "compact", **kwargs)
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters() if p.requires_grad], list(grad_enabled)

    full = loss_and_grads()
    partial = loss_and_grads(answer_chunks_only=True)
    hook.remove()
    assert full[2] == [True] * (chunks + 1)  # every chunk, then [question][answer]
    assert partial[2] == [i in example.answer_chunks for i in range(chunks)] + [True]
    assert partial[0] == pytest.approx(full[0], rel=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(full[1], partial[1]))
    assert any(float(g.abs().sum()) > 0 for g in partial[1])


def test_grad_chunks_setting_is_checked(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(Exception, match="grad_chunks must be one of"):
        settings(tiny_model_dir, data_file, grad_chunks="some")
    with pytest.raises(Exception, match="needs gist.positions: compact"):
        train(settings(tiny_model_dir, data_file, grad_chunks="answer", max_steps=1), tmp_path / "run")
    with pytest.raises(Exception, match="needs gist.positions: compact"):
        train(settings(tiny_model_dir, data_file, grad_chunks="copied", max_steps=1), tmp_path / "run")
