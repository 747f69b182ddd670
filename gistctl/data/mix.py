"""`mix`: a training mixture from a YAML recipe, with a held-out eval split built from disjoint seeds.

Recipe (see configs/recipes/data_mix.yaml):
    train: {n: 2000, seed: 1}        eval: {n: 200, seed: 2}        haystack_dir: null
    components: [{task, weight, tokens, options: {...}}, ...]
Component c of a split is built with seed `split_seed * 100 + c`, so its example seeds
(`build_seed * 1_000_000 + i`) never meet the other split's as long as the split seeds differ.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Iterator

import yaml

from gistctl.data.builders import build_aggregate, build_facts, build_niah, build_passkey
from gistctl.data.haystack import load_haystack
from gistctl.data.lengths import parse_lengths
from gistctl.data.qa import build_qa
from gistctl.data.squad import build_squad, build_squad_continuation
from gistctl.data.schema import TASKS
from gistctl.errors import ConfigError

SPLITS = ("train", "eval")
MAX_COMPONENTS = 100
COMPONENT_KEYS = {"task", "weight", "tokens", "options"}
OPTIONS = {  # builder keyword arguments a recipe may set, per task
    "passkey": {"key_format", "depth", "protocol"},
    "niah": {"depth", "kinds"},
    "facts": {"facts"},
    "aggregate": {"items", "questions", "counts", "values"},
    "qa": {"source", "context_field", "question_field", "answers_field", "id_field"},
    "squad": {"source", "unanswerable"},
    "squad_continue": {"source"},
}
# recipe components that are builders of another task's records: squad and squad_continue build `qa` records
RECIPE_TASKS = (*TASKS, "squad", "squad_continue")
# a squad component's mixture split -> the article split it draws from (its eval never the bench's articles)
SQUAD_SPLITS = {"train": "train", "eval": "dev"}
BUILDERS: dict[str, Callable[..., Iterator[dict]]] = {
    "passkey": build_passkey, "niah": build_niah, "facts": build_facts, "aggregate": build_aggregate, "qa": build_qa,
    "squad": build_squad, "squad_continue": build_squad_continuation,
}


def load_recipe(path: str | Path) -> dict:
    """Read and validate a mixture recipe; ConfigError names the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' does not exist")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {err}".splitlines()[0]) from err
    return validate_recipe(recipe, str(path))


def validate_recipe(recipe: object, where: str = "recipe") -> dict:
    if not isinstance(recipe, dict):
        raise ConfigError(f"{where}: a recipe is a mapping with train, eval and components")
    unknown = set(recipe) - {"train", "eval", "components", "haystack_dir"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for split in SPLITS:
        spec = recipe.get(split)
        if not isinstance(spec, dict) or set(spec) != {"n", "seed"} or not all(isinstance(spec[k], int) for k in spec):
            raise ConfigError(f"{where}: '{split}' must be {{n: <int>, seed: <int>}}")
        if spec["n"] < 0 or spec["seed"] < 0:
            raise ConfigError(f"{where}: '{split}' n and seed must be >= 0")
    if recipe["train"]["seed"] == recipe["eval"]["seed"]:
        raise ConfigError(f"{where}: train and eval seeds must differ so that held-out examples never overlap")
    components = recipe.get("components")
    if not isinstance(components, list) or not components or len(components) > MAX_COMPONENTS:
        raise ConfigError(f"{where}: 'components' must list 1..{MAX_COMPONENTS} builders")
    for index, component in enumerate(components):
        label = f"{where}: components[{index}]"
        if not isinstance(component, dict) or not COMPONENT_KEYS >= set(component) or "task" not in component:
            raise ConfigError(f"{label} must have task, weight, tokens and optional options")
        task = component["task"]
        if task not in RECIPE_TASKS:
            raise ConfigError(f"{label}: unknown task '{task}'; use one of {', '.join(RECIPE_TASKS)}")
        weight = component.get("weight", 1)
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"{label}: weight must be a positive number")
        parse_lengths(component.get("tokens"))
        options = component.get("options") or {}
        if not isinstance(options, dict) or not OPTIONS[task] >= set(options):
            raise ConfigError(f"{label}: {task} options are {', '.join(sorted(OPTIONS[task]))}")
        if task == "qa" and not (isinstance(options.get("source"), dict) and set(options["source"]) == set(SPLITS)):
            raise ConfigError(f"{label}: qa needs options.source: {{train: <file>, eval: <other file>}}")
        if task in ("squad", "squad_continue") and not isinstance(options.get("source"), str):
            raise ConfigError(f"{label}: {task} needs options.source: <SQuAD v2.0 JSON file>")
    return recipe


def split_counts(n: int, weights: list[float]) -> list[int]:
    """`n` shared by weight, largest remainder first (ties to the earlier component); sums to n exactly."""
    total = sum(weights)
    raw = [n * w / total for w in weights]
    counts = [int(r) for r in raw]
    for j in sorted(range(len(weights)), key=lambda k: (-(raw[k] - counts[k]), k))[: n - sum(counts)]:
        counts[j] += 1
    return counts


def build_split(tokenizer, recipe: dict, split: str, *, haystack=None) -> Iterator[dict]:
    """Records of one split, component by component; each record's meta gets `split` and `component`."""
    spec = recipe[split]
    components = recipe["components"]
    counts = split_counts(spec["n"], [float(c.get("weight", 1)) for c in components])
    for index, (component, count) in enumerate(zip(components, counts)):
        if count == 0:
            continue
        task = component["task"]
        kwargs = dict(component.get("options") or {})
        if task in ("squad", "squad_continue"):
            kwargs["tokens"] = parse_lengths(component.get("tokens"), default="512..4k")
            kwargs["split"] = SQUAD_SPLITS[split]
        elif task == "qa":
            kwargs["tokens"] = parse_lengths(component["tokens"]) if component.get("tokens") else None
            if isinstance(kwargs.get("source"), dict):  # {train: a.jsonl, eval: b.jsonl}: held out by file
                kwargs["source"] = kwargs["source"][split]
        else:
            kwargs["tokens"] = parse_lengths(component.get("tokens"))
            if task != "passkey" or kwargs.get("protocol") == "seed":
                kwargs["haystack"] = haystack
        for key in ("kinds", "questions"):  # a YAML list or "a,b" -> a tuple for the builder
            if isinstance(kwargs.get(key), str):
                kwargs[key] = tuple(part.strip() for part in kwargs[key].split(",") if part.strip())
            elif key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        for record in BUILDERS[task](tokenizer, n=count, seed=spec["seed"] * MAX_COMPONENTS + index, **kwargs):
            record["meta"]["split"] = split
            record["meta"]["component"] = index
            yield record


def build_mix(tokenizer, recipe: dict, *, on_record: Callable[[dict], None] | None = None) -> dict[str, list[dict]]:
    """{"train": records, "eval": records}; raises ConfigError if any example seed occurs in both splits."""
    haystack = load_haystack(recipe.get("haystack_dir"))
    splits = {}
    for split in SPLITS:
        records = []
        for record in build_split(tokenizer, recipe, split, haystack=haystack):
            records.append(record)
            if on_record:
                on_record(record)
        random.Random(recipe[split]["seed"]).shuffle(records)
        splits[split] = records
    synthetic = [{r["meta"]["seed"] for r in splits[s] if r["task"] != "qa"} for s in SPLITS]
    if synthetic[0] & synthetic[1]:
        raise ConfigError(f"train and eval share {len(synthetic[0] & synthetic[1])} example seed(s); give the splits other seeds")
    shared = {(r["context"], r["question"]) for r in splits["train"]} & {(r["context"], r["question"]) for r in splits["eval"]}
    if shared:
        raise ConfigError(f"train and eval share {len(shared)} example(s); a qa component needs "
                          "source: {train: <file>, eval: <other file>}")
    return splits


def write_mix(tokenizer, recipe: dict, output: str | Path, *,
              on_record: Callable[[dict], None] | None = None) -> dict[str, list[dict]]:
    """Build a mixture and write `train.jsonl`, `eval.jsonl` and the resolved `recipe.yaml` into `output`
    (recipe last, so a folder with a recipe.yaml holds a complete mixture)."""
    from gistctl.data.schema import write_jsonl
    from gistctl.runs import atomic_write_yaml

    output = Path(output)
    splits = build_mix(tokenizer, recipe, on_record=on_record)
    for split, records in splits.items():
        write_jsonl(output / f"{split}.jsonl", records)
    atomic_write_yaml(output / "recipe.yaml", recipe)
    return splits
