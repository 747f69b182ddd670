import pytest

from gistctl.config import GistctlConfig, config_from_dict, load_config
from gistctl.errors import ConfigError

# the seeds of the bench sets (README, Results): 9001-9007 passkey/niah/facts/aggregate, 9008 aggregate_40,
# 9009 passkey_2chunk (fixed vs even chunks), 9010 passkey_160, 9011 passkey_160b (p7-two-chunk vs the shipped adapter)
BENCH_SEEDS = set(range(9001, 9012))


def test_defaults_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("gist:\n  num_gist: 25\ntrain:\n  lr: 5e-4\n  max_steps: 10\n")
    config = load_config(path, {"train.max_steps": 7, "train.batch_size": None})
    assert config.gist.num_gist == 25
    assert config.train.lr == pytest.approx(5e-4)  # YAML reads 5e-4 as a string; it is coerced
    assert config.train.max_steps == 7  # flag beats YAML
    assert config.train.batch_size == GistctlConfig().train.batch_size  # None flag leaves the default


def test_old_name_of_k_still_loads_and_booleans_are_not_integers(tmp_path):
    """K was `gist.num_tokens` before it was `gist.num_gist` everywhere: old configs and flags still load."""
    path = tmp_path / "old.yaml"
    path.write_text("gist:\n  num_tokens: 12\n")
    assert load_config(path).gist.num_gist == 12
    assert load_config(None, {"gist.num_tokens": 5}).gist.num_gist == 5
    assert config_from_dict({"gist": {"num_tokens": 7}}).gist.num_gist == 7
    path.write_text("gist:\n  num_tokens: 12\n  num_gist: 12\n")
    with pytest.raises(ConfigError, match="same setting"):
        load_config(path)
    path.write_text("gist:\n  num_gist: true\n")
    with pytest.raises(ConfigError, match="gist.num_gist must be of type int"):
        load_config(path)


@pytest.mark.parametrize("text, key", [
    ("gist:\n  num_gist: -1\n", "gist.num_gist"),
    ("train:\n  lr: 0\n", "train.lr"),
    ("train:\n  lrr: 0.1\n", "train.lrr"),
    ("lora:\n  dropout: 1.5\n", "lora.dropout"),
    ("train:\n  data: missing.jsonl\n", "train.data"),
    ("optimizer:\n  lr: 1\n", "optimizer"),
    ("train:\n  max_steps: many\n", "train.max_steps"),
    ("gist:\n  positions: diagonal\n", "gist.positions"),
    ("gist:\n  chunking: halves\n", "gist.chunking"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)


def test_config_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError):
        load_config(tmp_path / "absent.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("gist_*.yaml"))
    assert [c.name for c in configs] == ["gist_10.yaml", "gist_25.yaml", "gist_50.yaml"]
    sizes = [load_config(c).gist.num_gist for c in configs]
    assert sizes == [10, 25, 50]


def test_default_curriculum_config_loads(monkeypatch):
    """configs/default.yaml: phases whose recipes are valid mixtures with held-out eval seeds."""
    from pathlib import Path

    from gistctl.data.mix import load_recipe

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # recipe paths are relative to the repo root
    config = load_config("configs/default.yaml")
    assert [p.name for p in config.phases] == ["p1-alnum6", "p2-mix", "p3-long", "p4-auto", "p5-aggregate", "p12-squad"]
    assert Path(config.train.init_adapter, "adapter_model.safetensors").is_file()  # the shipped phase-0 adapter
    assert config.total_steps() == sum(p.train.get("stop_at_step", p.train["max_steps"]) for p in config.phases) == 1150
    seeds = [load_recipe(p.recipe) for p in config.phases]
    train_seeds = {r["train"]["seed"] for r in seeds}
    eval_seeds = {r["eval"]["seed"] for r in seeds}
    assert not train_seeds & eval_seeds
    assert not (train_seeds | eval_seeds) & BENCH_SEEDS
    phase = config.phase_config(1, data="configs/recipes/data_mix.yaml", eval_data=None, init_adapter=None)
    assert phase.train.lr == config.train.lr and phase.train.max_steps == config.phases[1].train["max_steps"]
    long = config.phase_config(2, data="configs/recipes/data_mix.yaml", eval_data=None, init_adapter=None)
    assert (phase.gist.chunk_tokens, long.gist.chunk_tokens) == (512, 1024) and long.train.max_length == 2200
    auto = config.phase_config(3, data="configs/recipes/data_mix.yaml", eval_data=None, init_adapter=None)
    assert (auto.gist.positions, auto.train.grad_chunks, auto.gist.chunk_tokens) == ("auto", "answer", 1024)
    load_recipe("configs/recipes/data_phase0.yaml")  # the documented way to redo phase 0 stays valid
    assert not phase.phases


def test_round_trip_through_dict():
    config = load_config(None, {"gist.num_gist": 3})
    assert config_from_dict(config.to_dict()) == config


def test_every_config_loads_and_no_recipe_shares_seeds(monkeypatch):
    """Each curriculum config in configs/ loads; the mixtures its phases build draw from seeds no other
    recipe uses and never from the bench sets'. Two recipes may share an eval split only when it is the same
    split (same seed, size and components: one held-out set to compare runs on), never a train seed."""
    from pathlib import Path

    import yaml

    from gistctl.data.mix import load_recipe

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    recipes = {}
    for path in sorted(Path("configs").rglob("*.yaml")):
        if "phases" not in yaml.safe_load(path.read_text()):  # data recipes; configs naming built data files
            continue
        for phase in load_config(path).phases:
            recipes[phase.recipe] = load_recipe(phase.recipe)
    assert "configs/recipes/data_mix_long.yaml" in recipes
    train_seeds = [r["train"]["seed"] for r in recipes.values()]
    assert len(train_seeds) == len(set(train_seeds))
    evals = {}  # eval seed -> the split it builds
    for r in recipes.values():
        split = (r["eval"]["n"], yaml.safe_dump(r["components"], sort_keys=True))
        assert evals.setdefault(r["eval"]["seed"], split) == split, f"eval seed {r['eval']['seed']} builds two splits"
    assert not set(train_seeds) & set(evals)
    # component c of a split is built with seed split_seed * 100 + c (gistctl/data/mix.py)
    built = {r[split]["seed"] * 100 + c for r in recipes.values() for split in ("train", "eval")
             for c in range(len(r["components"]))}
    assert not built & BENCH_SEEDS


def test_grad_chunks_answer_is_checked_for_every_phase_before_anything_runs(tmp_path, monkeypatch):
    """A curriculum whose later phase would pair grad_chunks: answer with sequential positions is refused
    when the config loads, not hours later when that phase starts."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    path = tmp_path / "c.yaml"
    path.write_text("gist: {positions: compact}\ntrain: {grad_chunks: answer}\nphases:\n"
                    "  - {name: a, recipe: configs/recipes/data_mix_long.yaml}\n"
                    "  - {name: b, recipe: configs/recipes/data_mix_long.yaml, gist: {positions: sequential}}\n")
    with pytest.raises(ConfigError, match="grad_chunks: answer or copied needs gist.positions: compact"):
        load_config(path)
    path.write_text(path.read_text().replace("positions: sequential", "chunk_tokens: 512"))
    assert [p.name for p in load_config(path).phases] == ["a", "b"]


def test_a_phase_may_train_with_the_auto_layout_and_no_unknown_one(tmp_path, monkeypatch):
    """auto trains chunk by chunk like compact, so it takes grad_chunks: answer; a layout that does not exist
    is refused when the config loads, with the choices."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    path = tmp_path / "c.yaml"
    path.write_text("train: {grad_chunks: answer}\n"
                    "phases:\n  - {name: a, recipe: configs/recipes/data_mix_long.yaml, gist: {positions: auto}}\n")
    assert load_config(path).phases[0].gist["positions"] == "auto"
    path.write_text(path.read_text().replace("positions: auto", "positions: diagonal"))
    with pytest.raises(ConfigError, match=r"phases\.a\.gist\.positions .*sequential, compact, auto"):
        load_config(path)
    path.write_text(path.read_text().replace("positions: diagonal", "positions: auto, chunking: even"))
    assert load_config(path).phases[0].gist["chunking"] == "even"
    path.write_text(path.read_text().replace("chunking: even", "chunking: halves"))
    with pytest.raises(ConfigError, match=r"phases\.a\.gist\.chunking must be one of fixed, even"):
        load_config(path)
