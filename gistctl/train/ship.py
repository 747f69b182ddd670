"""Ship a trained checkpoint as a named adapter inside the package (`gistctl/adapters/<name>/`).

    gistctl adapter ship runs/default/final default [--note "..."]
    gistctl adapter ship gistctl/adapters/default default --positions auto   # re-ship, re-tuned
    gistctl adapter ship runs/more/final default --after gistctl/adapters/default   # a continuation

Copies the adapter files (not the optimizer state) into a temp directory, writes `meta.json` (recipe =
the run's resolved config, data fingerprints, step, every evaluation, adapter fingerprint), then swaps it
into place. `--after ADAPTER`: the run is a curriculum that started from that shipped adapter; meta.json
then records one curriculum from scratch, the shipped adapter's phases followed by the run's (see `continuation`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import yaml

from gistctl.config import PHASE_FIXED_KEYS, PHASE_GIST_KEYS, GistSettings, LoraSettings, ModelSettings, \
    TrainSettings, config_from_dict, renamed
from gistctl.errors import ConfigError
from gistctl.gist.adapter import GIST_META, SHIPPED_ADAPTERS, adapter_fingerprint, read_adapter_meta, write_adapter_meta
from gistctl.gist.chunks import check_chunking
from gistctl.gist.positions import check_layout
from gistctl.runs import replace_dir

FILES = ("adapter_config.json", "adapter_model.safetensors", GIST_META, "config.yaml", "tokenizer.json",
         "tokenizer_config.json", "chat_template.jinja")


def _settings(cls, values: dict) -> dict:
    """A saved config section with the defaults of keys added since it was saved."""
    section = {GistSettings: "gist", TrainSettings: "train", ModelSettings: "model", LoraSettings: "lora"}[cls]
    return {**dataclasses.asdict(cls()), **renamed(section, values)}


def continuation(prior_meta: dict, source_meta: dict, source_recipe: dict) -> dict:
    """meta.json's `recipe`, `phases`, `step` and `continues` for a curriculum run (`source_meta`, its config
    `source_recipe`) that started from the shipped adapter `prior_meta` describes: the run's phases follow the
    prior's, each with the settings it trained with that differ from the prior recipe's `train` and `gist`
    sections as its overrides. So `recipe` is one curriculum that trains the new adapter from scratch: the one
    configs/default.yaml must hold for the default adapter."""
    prior_recipe = prior_meta["recipe"]
    if not source_meta.get("phases") or not source_recipe.get("phases"):
        raise ConfigError("--after needs a curriculum run's final/ (a config with phases), not a step checkpoint")
    for section, cls in (("model", ModelSettings), ("lora", LoraSettings)):
        if _settings(cls, prior_recipe[section]) != _settings(cls, source_recipe[section]):
            raise ConfigError(f"--after: the run's {section} settings differ from the adapter it continues")
    base_gist, base_train = _settings(GistSettings, prior_recipe["gist"]), _settings(TrainSettings, prior_recipe["train"])
    source_gist, source_train = _settings(GistSettings, source_recipe["gist"]), _settings(TrainSettings, source_recipe["train"])
    if source_gist["num_gist"] != base_gist["num_gist"]:
        raise ConfigError("--after: the run has another number of gist tokens than the adapter it continues")
    phases = []
    for phase in source_recipe["phases"]:
        train = {**source_train, **phase.get("train", {})}
        gist = {**source_gist, **phase.get("gist", {})}
        phases.append({"name": phase["name"], "recipe": phase["recipe"],
                       "train": {k: v for k, v in train.items() if k not in PHASE_FIXED_KEYS and v != base_train[k]},
                       "gist": {k: gist[k] for k in PHASE_GIST_KEYS if gist[k] != base_gist[k]}})
    recipe = {**prior_recipe, "phases": prior_recipe["phases"] + phases}
    config_from_dict(recipe)  # one valid curriculum (unique phase names, recipes that exist)
    records = [{**record, "train": phase["train"], "gist": phase["gist"]}
               for record, phase in zip(source_meta["phases"], phases)]
    return {"recipe": recipe, "phases": prior_meta["phases"] + records, "step": prior_meta["step"] + source_meta["step"],
            "continues": {"name": prior_meta["name"], "adapter_fingerprint": prior_meta["adapter_fingerprint"],
                          "step": prior_meta["step"]}}


def ship_adapter(checkpoint: str | Path, name: str, *, note: str | None = None, chunk_tokens: int | None = None,
                 positions: str | None = None, chunking: str | None = None, after: str | Path | None = None,
                 target_root: Path = SHIPPED_ADAPTERS) -> Path:
    """`chunk_tokens` / `positions` / `chunking`: the chunk length, gist position layout and chunk split
    compress uses with this adapter, when a measured bench (--chunk-tokens, --positions, --chunking) favours
    other ones than it was trained with; meta.json records both. `after`: the shipped adapter the run started
    from (`continuation`)."""
    if positions is not None:
        check_layout(positions, allow_auto=True)
    if chunking is not None:
        check_chunking(chunking)
    checkpoint = Path(checkpoint)
    source_meta = json.loads((checkpoint / "meta.json").read_text())
    reshipped = "recipe" in source_meta  # an adapter shipped before, not a training run's checkpoint
    source_recipe = None if reshipped else yaml.safe_load((checkpoint / "config.yaml").read_text())
    continued = None  # checked before anything is written
    if after:
        if reshipped:
            raise ConfigError("--after takes a training run's final/, not an adapter shipped before")
        prior_meta = json.loads((Path(after) / "meta.json").read_text())  # read before it is replaced
        continued = continuation(prior_meta, source_meta, source_recipe)
    target = target_root / name
    tmp = target_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in FILES:
        if (checkpoint / file).is_file():
            shutil.copy2(checkpoint / file, tmp / file)
    if reshipped:  # keep its record, change only what is asked
        meta = {**source_meta, "name": name}
    else:
        meta = {
            "name": name,
            "source": str(checkpoint),
            "adapter_fingerprint": adapter_fingerprint(tmp),
            "step": source_meta["step"],
            "seed": source_meta["seed"],
            "recipe": source_recipe,
            "data": source_meta["data"],
            "evals": [{"step": e["step"], "overall": e["eval"]["overall"], "per_task": e["eval"]["per_task"],
                       "n": e["eval"]["n"]} for e in source_meta.get("evals", [])],
            "best_eval": source_meta.get("best_eval"),
        }
        if source_meta.get("phases"):  # a curriculum: every phase's recipe, data and evals
            meta["phases"] = source_meta["phases"]
        if continued is not None:
            meta.update(continued)
            (tmp / "config.yaml").write_text(yaml.safe_dump(meta["recipe"], sort_keys=False))  # not the run's own
    shipped = {key: value for key, value in (("chunk_tokens", chunk_tokens), ("positions", positions),
                                             ("chunking", chunking)) if value is not None}
    if shipped:
        gist = read_adapter_meta(tmp)
        trained = {key: getattr(gist, key) for key in ("chunk_tokens", "positions", "chunking")}
        for key, value in shipped.items():
            earlier = meta.get(key)  # a re-ship keeps the trained value recorded the first time
            meta[key] = {"trained": earlier["trained"] if isinstance(earlier, dict) else trained[key], "shipped": value}
        for key, value in shipped.items():
            setattr(gist, key, value)
        write_adapter_meta(tmp, gist)
    if note:
        meta["note"] = f"{meta['note']} {note}" if meta.get("note") else note
    meta["adapter_fingerprint"] = adapter_fingerprint(tmp)  # of the files shipped (gist.json included)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return replace_dir(tmp, target)
