"""Bring grid cells that DVC's experiment queue ran back into the workspace.

`dvc exp run --queue CELL` runs each cell in its own temporary copy of the repo; the outputs
land in the shared DVC cache and the cell's `dvc.lock` entry in the experiment's git ref.
`collect_experiments` merges, for every finished experiment of the current commit, the lock
entries of the stages it ran into the workspace's `dvc.lock` (a stage run by several: the
newest wins), then `dvc checkout`s those stages: their outputs appear in the workspace from the
cache, nothing is trained again. (DVC's run-cache cannot do this for the train cells: their
model folders are `persist: true`, for resumable checkpoints, and DVC does not run-cache
persistent outputs.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from mammodp.errors import DataError


def _git(root: Path, *args: str) -> str:
    res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if res.returncode != 0:
        raise DataError(f"git {' '.join(args)} failed: {res.stderr.strip()}", path=root)
    return res.stdout


def _lock_at(root: Path, rev: str) -> dict:
    res = subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=root, capture_output=True, text=True)
    return (yaml.safe_load(res.stdout) or {}).get("stages", {}) if res.returncode == 0 else {}


def collect_experiments(root: str | Path = ".", checkout: bool = True, refs: str | None = None) -> dict[str, str]:
    """Merge finished queue experiments' stage results into the workspace.

    Args:
        root: the repo.
        checkout: run `dvc checkout` on the collected stages (restores their outputs; without
            it, `dvc pull` fetches and checks them out from a remote).
        refs: a `git for-each-ref` pattern of other commits to collect from, e.g. the branches
            that grid tasks on other machines pushed (`refs/remotes/origin/grid/*`); default:
            the queue experiments of the current commit.

    Returns:
        {stage: experiment name} of every stage collected.

    Raises:
        DataError: not a git repo, or `dvc checkout` failed.
    """
    root = Path(root)
    head = _git(root, "rev-parse", "HEAD").strip()
    base = _lock_at(root, "HEAD")
    pattern = refs or f"refs/exps/{head[:2]}/{head[2:]}"
    found = _git(root, "for-each-ref", "--sort=committerdate", "--format=%(refname)", pattern).split()
    collected: dict[str, tuple[str, dict]] = {}
    for ref in found:
        name = ref.rsplit("/", 1)[1]
        for stage, entry in _lock_at(root, ref).items():
            if base.get(stage) != entry:  # the experiment (re)ran this stage
                collected[stage] = (name, entry)
    if not collected:
        return {}
    lock_path = root / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text()) if lock_path.is_file() else {"schema": "2.0", "stages": {}}
    lock.setdefault("stages", {}).update({stage: entry for stage, (_, entry) in collected.items()})
    lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))
    if checkout:
        res = subprocess.run(["dvc", "checkout", *collected], cwd=root, capture_output=True, text=True)
        if res.returncode != 0:
            raise DataError(f"dvc checkout failed: {(res.stderr or res.stdout).strip()[-800:]}", path=root)
    return {stage: name for stage, (name, _) in collected.items()}


__all__ = ["collect_experiments"]
