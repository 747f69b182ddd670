"""Settings as dataclasses; precedence: defaults -> YAML file -> CLI flags.

A YAML file has the sections `model`, `gist`, `lora`, `train`; every key must be a field below.
An optional `phases` list makes the run a curriculum (see `gistctl.train.curriculum`): each phase names
a data recipe, the `train` keys it changes and, optionally, its own `gist.chunk_tokens`.
Validation happens in `__post_init__` and raises `ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gistctl.errors import ConfigError, DataError
from gistctl.gist.chunks import CHUNKINGS, FIXED, check_chunking
from gistctl.gist.positions import CHUNKED_LAYOUTS, SEQUENTIAL, check_layout


def _positive(section: str, key: str, value, *, allow_zero: bool = False) -> None:
    bad = value < 0 if allow_zero else value <= 0
    if bad:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{key} must be {bound}, got {value!r}")


@dataclass
class ModelSettings:
    name: str | None = None  # None: the embedded default (SmolLM2-135M-Instruct)
    device: str | None = None  # None: cuda if available else cpu
    dtype: str | None = None  # None: bf16 on CUDA if supported else fp32
    load_in_4bit: bool = False
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        if self.dtype not in (None, "fp32", "bf16", "fp16"):
            raise ConfigError(f"model.dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if self.attn_implementation not in ("eager", "sdpa"):
            raise ConfigError(f"model.attn_implementation must be 'eager' or 'sdpa', got {self.attn_implementation!r}")


@dataclass
class GistSettings:
    num_gist: int = 10  # K gist tokens per chunk (configs before 0.2 call it num_tokens)
    chunk_tokens: int = 1024  # longest context one chunk compresses; longer documents are split
    # gist position layout (gistctl.gist.positions). sequential trains with one masked forward per batch;
    # compact trains through compress's own chunk-by-chunk read (a masked forward cannot express it), and
    # auto through the same read, each example in the layout compress chooses for it
    positions: str = SEQUENTIAL
    # how a document longer than one chunk is split (gistctl.gist.chunks): fixed (full chunks, then the rest)
    # or even (equal chunks)
    chunking: str = FIXED

    def __post_init__(self):
        _positive("gist", "num_gist", self.num_gist)
        _positive("gist", "chunk_tokens", self.chunk_tokens)
        _check_training_layout("gist.positions", self.positions)
        _check_chunking("gist.chunking", self.chunking)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        _positive("lora", "r", self.r)
        _positive("lora", "alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module, e.g. [q_proj, v_proj]")
        self.target_modules = list(self.target_modules)


GRAD_CHUNKS = ("all", "answer", "copied")
READERS = ("gist", "full")  # gistctl.train.objectives


def _check_stop_at_step(where: str, stop_at_step: int | None, max_steps: int) -> None:
    if stop_at_step is not None and not 1 <= stop_at_step <= max_steps:
        raise ConfigError(f"{where}stop_at_step must be in [1, max_steps={max_steps}], got {stop_at_step!r}")


@dataclass
class TrainSettings:
    data: str | None = None  # training JSONL
    eval: str | None = None  # evaluation JSONL, answered from the compressed KV
    init_adapter: str | None = None  # start from this adapter's LoRA weights and gist rows (curriculum phases)
    max_steps: int = 300
    lr: float = 5e-4  # LoRA weights
    gist_lr: float = 1e-3  # gist embedding rows
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512  # tokens of context + gists + question + answer; only the context is truncated
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = True  # autocast where the device supports it
    log_every: int = 1
    eval_every: int = 50
    eval_limit: int = 50
    stop_at_eval: float | None = None  # finish early (final/) once an evaluation scores at least this
    stop_at_step: int | None = None  # finish (final/) after this step; warmup and cosine still span max_steps
    save_every: int = 50
    # compact / auto positions only: "answer" backpropagates only through the chunks holding the answer;
    # "copied" does so only for tasks whose answer is copied from the text (an aggregate count "3" found in
    # "house number 23" is a coincidence: those examples backpropagate through every chunk)
    grad_chunks: str = "all"
    # answers that are codes (pass keys, ids, numbers) are trained one character per token (prompt.answer_ids)
    spell_codes: bool = False
    # gist: the question reads the gists (what compress makes); full: it reads the whole document (no gists), the
    # same LoRA on the same data as a trained ceiling for `ask --method full --adapter` (gistctl.train.objectives)
    reader: str = "gist"
    # context distillation (gist reader only): weight of KL(teacher || student) on the answer tokens, beside the
    # answer cross-entropy; 0 = off. The teacher reads the whole document: `base` (the adapter switched off) or a
    # `--reader full` adapter directory
    distill: float = 0.0
    teacher: str = "base"

    @property
    def last_step(self) -> int:
        """The step a run finishes at (stop_at_eval aside)."""
        return self.stop_at_step or self.max_steps

    def __post_init__(self):
        for key in ("max_steps", "lr", "gist_lr", "batch_size", "grad_accum", "max_length",
                    "log_every", "eval_every", "eval_limit", "save_every"):
            _positive("train", key, getattr(self, key))
        for key in ("warmup_steps", "weight_decay", "grad_clip", "seed"):
            _positive("train", key, getattr(self, key), allow_zero=True)
        if self.reader not in READERS:
            raise ConfigError(f"train.reader must be one of {', '.join(READERS)}, got {self.reader!r}")
        if isinstance(self.distill, bool) or not isinstance(self.distill, (int, float)) or self.distill < 0:
            raise ConfigError(f"train.distill must be a weight >= 0, got {self.distill!r}")
        if self.distill and self.reader != "gist":
            raise ConfigError("train.distill trains a gist reader towards a full-context teacher; "
                              "drop it with --reader full")
        if self.teacher != "base" and not (Path(self.teacher) / "adapter_model.safetensors").is_file():
            raise ConfigError(f"train.teacher must be 'base' or an adapter directory (trained with --reader full), "
                              f"got {self.teacher!r}")
        if self.grad_chunks not in GRAD_CHUNKS:
            raise ConfigError(f"train.grad_chunks must be one of {', '.join(GRAD_CHUNKS)}, got {self.grad_chunks!r}")
        _check_stop_at_step("train.", self.stop_at_step, self.max_steps)
        if self.stop_at_eval is not None:
            if not 0 < self.stop_at_eval <= 1:
                raise ConfigError(f"train.stop_at_eval must be in (0, 1], got {self.stop_at_eval!r}")
            if self.eval is None and self.data is not None:
                raise ConfigError("train.stop_at_eval needs train.eval (held-out examples to evaluate on)")
        for key in ("data", "eval"):
            value = getattr(self, key)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"train.{key}: file '{value}' does not exist; build one with `gistctl data`")
        if self.init_adapter is not None and not (Path(self.init_adapter) / "adapter_model.safetensors").is_file():
            raise ConfigError(f"train.init_adapter: '{self.init_adapter}' is not an adapter directory "
                              "(no adapter_model.safetensors); point it at a checkpoint's final/ or best/")


PHASE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
PHASE_FIXED_KEYS = ("data", "eval", "init_adapter")  # set by the curriculum itself
# num_gist is fixed: a phase starts from the previous phase's gist rows
PHASE_GIST_KEYS = ("chunk_tokens", "positions", "chunking")


def _check_training_layout(key: str, value: Any) -> None:
    """check_layout's rule, as a config error."""
    try:
        check_layout(value, allow_auto=True)
    except DataError as err:
        raise ConfigError(f"{key} must name a gist position layout: {err}") from None


def _check_chunking(key: str, value: Any) -> None:
    """check_chunking's rule, as a config error."""
    try:
        check_chunking(value)
    except DataError:
        raise ConfigError(f"{key} must be one of {', '.join(CHUNKINGS)}, got {value!r}") from None


@dataclass
class PhaseSettings:
    """One phase of a curriculum: data built from `recipe` (a `gistctl data mix` recipe), the `train`
    settings that differ from the config's `train` section (max_steps, max_length, ...) and the `gist`
    settings that differ (chunk_tokens, positions, chunking: later phases may read longer documents differently)."""

    name: str
    recipe: str
    train: dict[str, Any] = field(default_factory=dict)
    gist: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not PHASE_NAME.match(self.name):
            raise ConfigError(f"phases: name {self.name!r} must be lower-case letters, digits, '-' or '_'")
        if not Path(self.recipe).is_file():
            raise ConfigError(f"phases.{self.name}.recipe: file '{self.recipe}' does not exist")
        known = {f.name for f in dataclasses.fields(TrainSettings)} - set(PHASE_FIXED_KEYS)
        self.train = self._overrides("train", self.train, known)
        self.gist = self._overrides("gist", self.gist, set(PHASE_GIST_KEYS),
                                    " (K is fixed: a phase starts from the previous phase's gist rows)")
        if "positions" in self.gist:
            _check_training_layout(f"phases.{self.name}.gist.positions", self.gist["positions"])
        if "chunking" in self.gist:
            _check_chunking(f"phases.{self.name}.gist.chunking", self.gist["chunking"])

    def _overrides(self, section: str, values: Any, valid: set[str], why: str = "") -> dict[str, Any]:
        """The `section` keys this phase changes, checked against `valid` and typed like the section's fields."""
        if not isinstance(values, dict):
            raise ConfigError(f"phases.{self.name}.{section} must be a mapping of {section} keys")
        for key in values:
            if key not in valid:
                raise ConfigError(f"unknown key 'phases.{self.name}.{section}.{key}'; valid keys: "
                                  f"{', '.join(sorted(valid))}{why}")
        return {k: _coerce(section, k, v) for k, v in values.items()}


@dataclass
class GistctlConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    gist: GistSettings = field(default_factory=GistSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    phases: list[PhaseSettings] = field(default_factory=list)

    def __post_init__(self):
        names = [phase.name for phase in self.phases]
        if len(set(names)) != len(names):
            raise ConfigError(f"phases: names must be unique, got {names}")
        if self.phases and self.train.data is not None:
            raise ConfigError("train.data and phases exclude each other: a curriculum builds each phase's data "
                              "from its recipe")
        for phase in self.phases:  # a phase's own train keys are checked when it runs; this one decides total_steps
            train = self._phase_train(phase)
            _check_stop_at_step(f"phases.{phase.name}: ", train["stop_at_step"], train["max_steps"])
        # each phase trains with its own positions and grad_chunks: check them all before anything runs
        runs = [(p.gist.get("positions", self.gist.positions), p.train.get("grad_chunks", self.train.grad_chunks))
                for p in self.phases] or [(self.gist.positions, self.train.grad_chunks)]
        if any(grad != "all" and positions not in CHUNKED_LAYOUTS for positions, grad in runs):
            raise ConfigError("train.grad_chunks: answer or copied needs gist.positions: compact or auto (the "
                              "sequential layout trains one masked forward over the whole example, not chunk by chunk)")

    def total_steps(self) -> int:
        """Optimizer steps of the whole run: the sum over phases, or the run's own without phases."""
        if not self.phases:
            return self.train.last_step
        return sum(train["stop_at_step"] or train["max_steps"] for train in map(self._phase_train, self.phases))

    def _phase_train(self, phase: PhaseSettings) -> dict[str, Any]:
        """A phase's train settings: its own keys over the config's train section."""
        return {**dataclasses.asdict(self.train), **phase.train}

    def phase_config(self, index: int, *, data: str, eval_data: str | None,
                     init_adapter: str | None) -> "GistctlConfig":
        """The plain (phase-less) config phase `index` trains with."""
        phase = self.phases[index]
        train = {**self._phase_train(phase), "data": data, "eval": eval_data, "init_adapter": init_adapter}
        gist = GistSettings(**{**dataclasses.asdict(self.gist), **phase.gist})
        return GistctlConfig(model=self.model, gist=gist, lora=self.lora, train=TrainSettings(**train))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.phases:
            del out["phases"]  # a plain run's config.yaml stays as before
        return out


_SECTION_CLASSES = {"model": ModelSettings, "gist": GistSettings, "lora": LoraSettings, "train": TrainSettings}
# old key -> its name now, per section: configs, checkpoints and shipped recipes written before the rename load as they are
RENAMED_KEYS = {"gist": {"num_tokens": "num_gist"}}


def renamed(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """`values` with the section's old key names replaced by their current ones."""
    names = RENAMED_KEYS.get(section, {})
    out = {}
    for key, value in values.items():
        new = names.get(key, key)
        if new in out or (new != key and new in values):
            raise ConfigError(f"{section}.{key} and {section}.{new} are the same setting: give it once, as {new}")
        out[new] = value
    return out


def _phases(source: str, value: Any) -> list[PhaseSettings]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"phases in {source} must be a non-empty list of {{name, recipe, train}} mappings")
    phases = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not {"name", "recipe"} <= set(item) <= {"name", "recipe", "train", "gist"}:
            raise ConfigError(f"phases[{index}] in {source} must have name, recipe and optional train and gist")
        phases.append(PhaseSettings(name=item["name"], recipe=str(item["recipe"]), train=item.get("train") or {},
                                    gist=item.get("gist") or {}))
    return phases


def _check_keys(source: str, section: str, values: dict) -> None:
    cls = _SECTION_CLASSES[section]
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown key '{section}.{key}' in {source}; valid keys: {', '.join(sorted(known))}")


def _coerce(section: str, key: str, value: Any) -> Any:
    """YAML reads `5e-4` as a string and flags arrive as text: convert to the field's declared type."""
    kind = {f.name: f.type for f in dataclasses.fields(_SECTION_CLASSES[section])}[key]
    try:
        if kind == "bool" and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if kind == "int":
            if isinstance(value, bool):  # YAML's `true` is no integer
                raise ValueError(value)
            if float(value) != int(float(value)):
                raise ValueError(value)
            return int(float(value))
        if kind in ("float", "float | None") and value is not None and not isinstance(value, bool):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{section}.{key} must be of type {kind}, got {value!r}") from None
    return value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> GistctlConfig:
    """Defaults, then the YAML file at `path`, then `overrides` ({"train.lr": 1e-4, ...}; None values skipped)."""
    merged: dict[str, dict] = {name: {} for name in _SECTION_CLASSES}
    phases: list[PhaseSettings] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {err}".splitlines()[0]) from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must be a mapping of sections ({', '.join(_SECTION_CLASSES)})")
        for section, values in data.items():
            if section == "phases":
                phases = _phases(str(path), values)
                continue
            if section not in _SECTION_CLASSES:
                raise ConfigError(f"unknown section '{section}' in {path}; valid sections: "
                                  f"{', '.join(_SECTION_CLASSES)}, phases")
            if not isinstance(values, dict):
                raise ConfigError(f"section '{section}' in {path} must be a mapping of keys to values")
            values = renamed(section, values)
            _check_keys(str(path), section, values)
            merged[section].update({k: _coerce(section, k, v) for k, v in values.items()})
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if section not in _SECTION_CLASSES:
            raise ConfigError(f"unknown setting '{dotted}'")
        key = RENAMED_KEYS.get(section, {}).get(key, key)
        _check_keys("command-line flags", section, {key: value})
        merged[section][key] = _coerce(section, key, value)
    try:
        return GistctlConfig(**{name: cls(**merged[name]) for name, cls in _SECTION_CLASSES.items()}, phases=phases)
    except TypeError as err:  # wrong value type that dataclasses could not take
        raise ConfigError(str(err)) from err


def config_from_dict(data: dict[str, Any]) -> GistctlConfig:
    """Rebuild a config saved with `to_dict` (e.g. a checkpoint's config.yaml), validating it again."""
    phases = _phases("the saved config", data["phases"]) if data.get("phases") else []
    return GistctlConfig(**{name: cls(**renamed(name, data.get(name, {}))) for name, cls in _SECTION_CLASSES.items()},
                         phases=phases)
