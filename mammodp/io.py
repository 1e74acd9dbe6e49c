"""Atomic file output: write to a temp path beside the target, then rename.

A stage that fails half-way leaves its previous outputs untouched and no partial files. That
holds for SIGTERM and SIGHUP too: `raise_on_termination` (installed by `atomic_dir`,
`atomic_path` and `mammodp.tracking.start_run`) turns them into `mammodp.errors.Interrupted`,
a KeyboardInterrupt, so the temp paths are removed as for Ctrl-C. Only kill -9 leaves
`.<name>.tmp-*` behind; `mammodp.checkpoint.remove_stale_temps` clears them on the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator


def _terminate(signum: int, frame: Any) -> None:
    from mammodp.errors import Interrupted

    raise Interrupted(signum)


def raise_on_termination() -> None:
    """Make SIGTERM and SIGHUP raise `Interrupted` (a KeyboardInterrupt) in the main thread.

    Only signals still at their default action are taken (a host's own handler is kept), and
    only from the main thread (Python delivers signals there). Idempotent.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _terminate)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder; on success it replaces `target` whole, on error it is removed."""
    raise_on_termination()
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp file path beside `target`; renamed onto it on success."""
    raise_on_termination()
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as the strings 'inf', '-inf', 'nan'."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(target: str | Path, data: Any) -> None:
    """Write JSON atomically (sorted keys, inf/nan as strings)."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(_finite(data), indent=2, sort_keys=True, default=_json_default) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def saved_classifiers(models_dir: str | Path) -> list[tuple[Path, dict]]:
    """(folder, meta) of every classifier saved under `models_dir/<cell>/seed=<s>/` (the grid's
    layout), sorted by path. Each meta names the MLflow run that trained it (`run_id`).

    Raises:
        DataError: a `meta.json` that cannot be read (naming the file).
    """
    from mammodp.errors import DataError

    found = []
    for meta in sorted(Path(models_dir).glob("*/seed=*/meta.json")):
        try:
            found.append((meta.parent, json.loads(meta.read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"unreadable model record: {exc}", path=meta) from exc
    return found
