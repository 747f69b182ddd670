"""Run directories and atomic writes.

Every command that produces output works in `runs/<command>-<UTC timestamp>-<short id>/` (or `--run-dir`),
which holds the resolved `config.yaml` and a `meta.json` written before work starts. Files are written
to a temporary name in the same directory and moved into place with `os.replace`, so a crash never
leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import yaml

from gistctl import __version__


LEGACY_TEMP_AGE_S = 600  # a temp file without a pid in its name (gistctl < 0.2) is stale after this long


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temp files earlier writes to `path` left behind (`.<name>.<pid>.<random>.tmp` whose process is
    gone, or an old-style `.<name>.<random>.tmp` older than LEGACY_TEMP_AGE_S); a live writer's temp file stays."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = f".{path.name}."
    for candidate in path.parent.iterdir():
        name = candidate.name
        if not (name.startswith(prefix) and name.endswith(".tmp")) or not candidate.is_file():
            continue
        middle = name[len(prefix):-len(".tmp")].split(".")
        if len(middle) == 2 and middle[0].isdigit():
            stale = not _pid_alive(int(middle[0]))
        else:
            try:
                stale = time.time() - candidate.stat().st_mtime > LEGACY_TEMP_AGE_S
            except FileNotFoundError:
                continue
        if stale:
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed. A process
    killed before either leaves `.<name>.<pid>.<random>.tmp`, which the next write to `path` deletes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_yaml(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def replace_dir(tmp: str | Path, target: str | Path) -> Path:
    """Move the complete directory `tmp` to `target`, replacing an older `target`: the old copy is set
    aside first and deleted only once the new one is in place, so `target` is never half-written."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = target.parent / f".{target.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


LOCK_FILE = ".lock"


@contextlib.contextmanager
def lock_dir(path: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on the directory `path` (made if missing) for the block; a second holder is
    refused at once with RunLockedError. The lock is the OS's (flock): it ends with the process, however it ends."""
    import fcntl

    from gistctl.errors import RunLockedError

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / LOCK_FILE, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunLockedError(f"run directory '{path}' is in use by {holder}; wait for it to finish or use "
                                 "another --run-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"gistctl pid {os.getpid()}\n")
        handle.flush()
        yield path
    finally:
        handle.close()


def runs_root() -> Path:
    """Where run directories go: `$GISTCTL_RUNS`, default `./runs`."""
    return Path(os.environ.get("GISTCTL_RUNS") or "runs")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_meta() -> dict[str, Any]:
    """Versions and device: what a reader needs to reproduce or compare a run."""
    import torch
    import transformers

    return {
        "gistctl_version": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
    }


@dataclass
class RunDir:
    """A run directory: `path` plus helpers that write into it atomically."""

    path: Path

    @classmethod
    def create(cls, command: str, config: dict[str, Any] | None = None, *, seed: int | None = None,
               run_dir: str | Path | None = None, argv: list[str] | None = None) -> "RunDir":
        """Make the directory and write `config.yaml` and `meta.json` before any work starts."""
        if run_dir is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            run_dir = runs_root() / f"{command}-{stamp}-{secrets.token_hex(3)}"
        path = Path(run_dir)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.write_yaml("config.yaml", config or {})
        meta = {"command": command, "created_at": utc_now(), "seed": seed,
                "argv": argv if argv is not None else sys.argv, **environment_meta()}
        run.write_json("meta.json", meta)
        return run

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> Path:
        atomic_write_json(self.file(name), obj)
        return self.file(name)

    def write_yaml(self, name: str, obj: Any) -> Path:
        atomic_write_yaml(self.file(name), obj)
        return self.file(name)

    def write_text(self, name: str, text: str) -> Path:
        atomic_write_text(self.file(name), text)
        return self.file(name)
