"""Resume checkpoints that cannot ship stale weights, and one trainer per output folder.

A checkpoint (`save_checkpoint` / `load_checkpoint`) is one `torch.save` file holding plain
data only (tensors, numbers, strings, lists, dicts; numpy arrays are stored as tensors), read
back with `torch.load(weights_only=True)`: loading never runs pickled code. It records the
settings that made it (every setting of the run, as JSON) and their SHA-256; resuming with
any other settings is refused (or, for the pipeline's `--resume-if-valid`, the checkpoint is
set aside and the run starts afresh), naming the first setting that differs. It is written
atomically (temp file, fsync, rename), so a kill at any moment leaves the previous checkpoint
or the new one, never half of one.

`exclusive_output(out, ...)` guards a stage's declared output folder: a lock (`flock` on
`out/.checkpoints/lock`, released by the kernel however the process ends) refuses a second
trainer on the same folder, stale `.tmp-*` / `.old-*` siblings a kill -9 left behind are
removed once the lock is held, and the checkpoints live inside the output folder
(`out/.checkpoints/`), so they follow `--out` and vanish when the finished output replaces it.

Nothing here imports MLflow or reads params: stages pass the settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from mammodp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT = "mammodp-checkpoint/1"
CHECKPOINT_DIR = ".checkpoints"  # inside the stage's output folder
LOCK_NAME = "lock"
_NUMPY = "__numpy__"  # marks a numpy array stored as a tensor


# --------------------------------------------------------------------------- settings


def flat_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as `{dotted.key: JSON-safe value}` (tuples as lists, inf as 'inf')."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, dict):
            out.update(flat_settings(value, name))
        else:
            out[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and np.ndim(value) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def settings_hash(flat: dict[str, Any]) -> str:
    """SHA-256 of flat settings (sorted keys, canonical JSON)."""
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def first_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first dotted key (in the current run's order: params before derived values) whose
    value differs, described; None if all agree."""
    for key in [*current, *(k for k in saved if k not in current)]:
        if key not in saved:
            return f"{key} (not recorded in the checkpoint; this run has {current[key]!r})"
        if key not in current:
            return f"{key} (the checkpoint has {saved[key]!r}; this run has no such setting)"
        if saved[key] != current[key]:
            return f"{key} (the checkpoint was made with {saved[key]!r}, this run has {current[key]!r})"
    return None


class SettingsMismatch(ConfigError):
    """A checkpoint was made with other settings than the run that would resume it."""


# --------------------------------------------------------------------------- plain-data state


def _encode(obj: Any) -> Any:
    """State -> what `torch.load(weights_only=True)` reads: numpy arrays become tagged tensors."""
    import torch

    if isinstance(obj, np.ndarray):
        return {_NUMPY: torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_encode(v) for v in obj)
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_NUMPY}:
            return obj[_NUMPY].numpy()
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_decode(v) for v in obj)
    return obj


def save_checkpoint(path: str | Path, state: dict[str, Any], settings: dict[str, Any]) -> Path:
    """Write `state` with the settings that made it, atomically (temp + fsync + rename).

    Args:
        path: the checkpoint file.
        state: plain data: tensors, numpy arrays, numbers, strings, lists, dicts.
        settings: every setting of the run (nested dicts or dataclasses are flattened).

    Returns:
        The path.
    """
    import torch

    from mammodp.io import atomic_path

    flat = flat_settings(settings)
    payload = {"format": FORMAT, "settings_json": json.dumps(flat),  # caller's order, for messages
               "settings_sha256": settings_hash(flat), "state": _encode(state)}
    target = Path(path)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
    return target


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, flat settings) of a checkpoint, loaded with `weights_only=True` (no pickled code).

    Raises:
        DataError: not a readable mammodp checkpoint (corrupt, truncated, foreign, or holding
            objects other than plain data).
    """
    import pickle

    import torch

    p = Path(path)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"not a readable checkpoint ({type(exc).__name__}: {reason})", path=p) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"not a {FORMAT} file", path=p)
    flat = json.loads(payload["settings_json"])
    if settings_hash(flat) != payload["settings_sha256"]:
        raise DataError("checkpoint settings do not match their recorded hash (the file was altered)", path=p)
    return _decode(payload["state"]), flat


def load_checkpoint(path: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The state of a checkpoint made with exactly `settings`.

    Raises:
        SettingsMismatch: it was made with other settings (the first differing key is named).
        DataError: it is unreadable.
    """
    state, saved = read_checkpoint(path)
    current = flat_settings(settings)
    if settings_hash(saved) != settings_hash(current):
        diff = first_difference(saved, current)
        raise SettingsMismatch(f"cannot resume: checkpoint made with other settings, first difference: {diff}; "
                               "resume with the same settings, or train afresh without --resume", path=path)
    return state


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where one training run checkpoints, the settings that run stands for, and what to do
    with a checkpoint it cannot use.

    Attributes:
        path: the checkpoint file.
        settings: the caller's settings (the training loop adds its own `fit` spec).
        on_mismatch: `refuse` (explicit `--resume`: raise naming the first difference) or
            `restart` (pipeline `--resume-if-valid`: warn, set it aside, train afresh).
    """

    path: Path
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    on_mismatch: Literal["refuse", "restart"] = "refuse"

    def _all(self, spec: Any) -> dict[str, Any]:
        return {**self.settings, "fit": dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else spec}

    def load(self, spec: Any) -> dict[str, Any] | None:
        """The saved state to resume from, or None (no checkpoint, or an unusable one under `restart`)."""
        if not self.path.is_file():
            return None
        try:
            return load_checkpoint(self.path, self._all(spec))
        except (SettingsMismatch, DataError) as exc:
            if self.on_mismatch == "refuse":
                raise
            aside = self.path.with_name(self.path.name + ".unusable")
            os.replace(self.path, aside)
            log.warning("%s; training afresh (kept as %s)", exc, aside)
            return None

    def save(self, state: dict[str, Any], spec: Any) -> None:
        save_checkpoint(self.path, state, self._all(spec))


def as_checkpoint(checkpoint: Checkpoint | str | Path | None) -> Checkpoint | None:
    """A `Checkpoint` from a bare path (settings = the training spec only), or as given."""
    if checkpoint is None or isinstance(checkpoint, Checkpoint):
        return checkpoint
    return Checkpoint(Path(checkpoint))


# --------------------------------------------------------------------------- one trainer per output


class OutputLocked(DataError):
    """Another process holds the lock on this output folder."""


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Remove the `.<name>.tmp-*` / `.<name>.old-*` siblings that `atomic_dir`/`atomic_path`
    leave when a process is killed with -9 (call only while holding the target's lock)."""
    t = Path(target)
    removed = []
    if not t.parent.is_dir():
        return removed
    for pattern in (f".{t.name}.tmp-*", f".{t.name}.old-*"):
        for p in t.parent.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d stale temporary output(s) of %s left by a killed run", len(removed), t)
    return removed


@contextlib.contextmanager
def exclusive_output(out: str | Path, *also: str | Path | None) -> Iterator[Path]:
    """Hold the lock on output folder `out`; yield its checkpoint folder (`out/.checkpoints`).

    Stale temporary siblings of `out` and of every path in `also` (e.g. the metrics file) are
    removed once the lock is held: no other writer can own them then.

    Raises:
        OutputLocked: another live process holds the lock (its pid is named).
    """
    out = Path(out)
    ckpt = out / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    lock_path = ckpt / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise OutputLocked(f"another trainer (pid {holder}) is writing this output; stop it (or wait for it) "
                               "before starting a second one", path=out) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for target in (out, *[a for a in also if a is not None]):
            remove_stale_temps(target)
        yield ckpt
    finally:
        os.close(fd)  # releases the flock (the kernel does the same for a killed process)


__all__ = [
    "FORMAT",
    "CHECKPOINT_DIR",
    "Checkpoint",
    "SettingsMismatch",
    "OutputLocked",
    "as_checkpoint",
    "flat_settings",
    "settings_hash",
    "first_difference",
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint",
    "remove_stale_temps",
    "exclusive_output",
]
