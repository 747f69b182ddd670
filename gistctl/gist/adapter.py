"""The adapter folder: a trained gist adapter on disk, self-describing, and how a name resolves to one.

Files (format `ADAPTER_FORMAT_VERSION`, see docs/design.md):
- `adapter_config.json`, `adapter_model.safetensors`: PEFT's LoRA weights and the gist embedding rows only
  (`save_embedding_layers=False`);
- the tokenizer, with its gist tokens;
- `gist.json`: `AdapterMeta` (K, gist ids, chunk length, position layout, chunking, base model and its
  fingerprint, format version), plus whatever training recorded beside it (e.g. `trained_steps`);
- shipped adapters also carry `meta.json` (recipe, data, evaluations) and `config.yaml`.

The fingerprint is the sha256 of the two PEFT files and of the reading settings in `gist.json`, so two
adapters that differ only in K, chunk length, layout or chunking never share one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from gistctl.errors import ModelLoadError
from gistctl.gist.chunks import FIXED, check_chunking
from gistctl.gist.positions import SEQUENTIAL, check_layout
from gistctl.runs import atomic_write_json, atomic_write_text

ADAPTER_FORMAT_VERSION = 2  # 1: gist.json without format_version; its fingerprint covered the PEFT files only
GIST_META = "gist.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
NO_ADAPTER = "none"
SHIPPED_ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
DEFAULT_ADAPTER = "default"
# the gist.json fields that change how a document is read: the fingerprint covers them
READING_FIELDS = ("num_gist", "gist_ids", "chunk_tokens", "positions", "chunking", "base_fingerprint")


@dataclass
class AdapterMeta:
    """gist.json: what compress and ask need to read with an adapter."""

    num_gist: int  # K gist tokens per chunk
    gist_ids: list[int]  # token ids of the K gist tokens in the adapter's tokenizer
    chunk_tokens: int  # longest chunk compress reads before K gists
    base_model: str  # name of the base model it was trained on
    base_fingerprint: str | None  # that model's fingerprint (gistctl.models); None: not checked
    positions: str = SEQUENTIAL  # gist position layout (gistctl.gist.positions), or auto
    chunking: str = FIXED  # how compress splits a document (gistctl.gist.chunks)
    format_version: int = ADAPTER_FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # anything else training recorded (kept, not interpreted)

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **data}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "AdapterMeta":
        if not isinstance(data, dict):
            raise ModelLoadError(f"{where}: {GIST_META} is not a JSON object")
        # version 1 (no format_version) lacked positions / chunking before they existed: sequential, fixed
        version = data.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version > ADAPTER_FORMAT_VERSION:
            raise ModelLoadError(f"{where}: adapter format {version!r} is not one this gistctl reads "
                                 f"(1..{ADAPTER_FORMAT_VERSION}); upgrade gistctl")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [n for n in ("num_gist", "gist_ids", "chunk_tokens", "base_model") if n not in data]
        if missing:
            raise ModelLoadError(f"{where}: {GIST_META} lacks {', '.join(missing)}")
        num_gist, gist_ids, chunk_tokens = data["num_gist"], data["gist_ids"], data["chunk_tokens"]
        if not _positive_int(num_gist) or not _positive_int(chunk_tokens):
            raise ModelLoadError(f"{where}: num_gist and chunk_tokens must be positive integers")
        if not isinstance(gist_ids, list) or len(gist_ids) != num_gist or not all(_positive_int(i) for i in gist_ids):
            raise ModelLoadError(f"{where}: gist_ids must be {num_gist} token ids")
        values = {k: v for k, v in data.items() if k in names}
        values["format_version"] = ADAPTER_FORMAT_VERSION
        meta = cls(**values, extra={k: v for k, v in data.items() if k not in names})
        check_layout(meta.positions, allow_auto=True)
        check_chunking(meta.chunking)
        return meta

    def fingerprint_payload(self) -> bytes:
        return json.dumps({k: getattr(self, k) for k in READING_FIELDS}, sort_keys=True).encode()


def adapter_reader(meta: AdapterMeta) -> str:
    """How the adapter was trained to read: `gist` (from gists: compress + ask) or `full` (whole documents:
    `ask --method full --adapter`; `gistctl train --reader full`, recorded in gist.json)."""
    return meta.extra.get("reader", "gist")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_adapter_meta(adapter_dir: str | Path) -> AdapterMeta:
    """gist.json, validated; older adapters get the reading settings they were made with filled in."""
    path = Path(adapter_dir) / GIST_META
    if not path.is_file():
        raise ModelLoadError(f"'{adapter_dir}' is not a gist adapter directory ({GIST_META} is missing)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"'{adapter_dir}': {GIST_META} is not readable JSON ({err})") from err
    return AdapterMeta.from_json(data, f"adapter '{adapter_dir}'")


def adapter_fingerprint(adapter_dir: str | Path) -> str:
    """sha256 of the PEFT files and of the reading settings in gist.json."""
    meta = read_adapter_meta(adapter_dir)
    digest = hashlib.sha256()
    for name in PEFT_FILES:
        path = Path(adapter_dir) / name
        if not path.is_file():
            raise ModelLoadError(f"'{adapter_dir}' is not a gist adapter: {name} is missing")
        digest.update(name.encode())
        digest.update(path.read_bytes())
    digest.update(GIST_META.encode())
    digest.update(meta.fingerprint_payload())
    return digest.hexdigest()


def write_adapter_meta(directory: str | Path, meta: AdapterMeta) -> None:
    atomic_write_json(Path(directory) / GIST_META, meta.to_json())


def save_adapter(peft_model, loaded, gist_ids: list[int], chunk_tokens: int, directory: Path,
                 extra_meta: dict | None = None, positions: str = SEQUENTIAL, chunking: str = FIXED) -> str:
    """Write the adapter directory (caller makes it atomic by writing into a temp dir); returns its fingerprint.
    `loaded`: the base `LoadedModel`; `chunk_tokens`, `positions` (the gist layout) and `chunking` are what
    compress will use with it; `extra_meta` is recorded in gist.json beside them."""
    directory = Path(directory)
    meta = AdapterMeta(num_gist=len(gist_ids), gist_ids=list(gist_ids), chunk_tokens=chunk_tokens,
                       base_model=loaded.name, base_fingerprint=loaded.fingerprint,
                       positions=check_layout(positions, allow_auto=True), chunking=check_chunking(chunking),
                       extra=dict(extra_meta or {}))
    peft_model.save_pretrained(directory, save_embedding_layers=False)
    _sort_target_modules(directory / "adapter_config.json")
    loaded.tokenizer.save_pretrained(directory)
    write_adapter_meta(directory, meta)
    return adapter_fingerprint(directory)


def _sort_target_modules(path: Path) -> None:
    """PEFT writes target_modules in its set's order, which changes from process to process (string hashing):
    the same weights saved twice would get two fingerprints. Sorted, the file depends on the adapter alone."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True))


def shipped_adapter_name(path: str | Path) -> str | None:
    """The name of a shipped adapter folder, or None for any other folder."""
    path = Path(path).resolve()
    return path.name if path.parent == SHIPPED_ADAPTERS.resolve() else None


def shipped_adapter_dir(name: str) -> Path | None:
    """The folder of the shipped adapter `name` (a bare name: no '/', no '..'), or None."""
    if "/" in name or "\\" in name or name in (".", "..") or not name:
        return None
    path = SHIPPED_ADAPTERS / name
    return path if (path / GIST_META).is_file() else None


def resolve_adapter(spec: str | None) -> Path | None:
    """None -> the shipped default adapter; 'none' -> untrained gist tokens (debugging); a bare name (no '/',
    no '..') -> that shipped adapter if there is one, else a directory; anything else -> a directory."""
    if spec == NO_ADAPTER:
        return None
    if spec is None:
        path = SHIPPED_ADAPTERS / DEFAULT_ADAPTER
        if not (path / GIST_META).is_file():
            raise ModelLoadError("no default gist adapter is shipped yet; pass --adapter DIR (train one with "
                                 "`gistctl train`), or --adapter none for untrained gist tokens")
        return path
    path = Path(spec).expanduser()
    if not path.exists() and shipped_adapter_dir(spec):
        path = shipped_adapter_dir(spec)
    if not path.is_dir():
        raise ModelLoadError(f"adapter directory '{spec}' does not exist")
    read_adapter_meta(path)
    return path
