"""The local MLflow store records no absolute path of the clone: a copied project (mlflow.db
and mlruns/ together) reads and writes its own artifacts, not the original's."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import mlflow

from mammodp import tracking

ROOT = Path(__file__).resolve().parents[1]


def strings_containing(db: Path, needle: str) -> list[tuple[str, str, str]]:
    con = sqlite3.connect(db)
    hits = []
    for (table,) in con.execute("select name from sqlite_master where type = 'table'"):
        cols = [c[1] for c in con.execute(f"pragma table_info({table})")]
        for row in con.execute(f"select * from {table}"):
            hits += [(table, c, v) for c, v in zip(cols, row) if isinstance(v, str) and needle in v]
    con.close()
    return hits


def test_a_copied_project_uses_its_own_artifacts(tmp_path, monkeypatch):
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    monkeypatch.chdir(original)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # the local default, relative
    with tracking.start_run("test-local", "train", tags={"epsilon": "1"}) as run:
        mlflow.log_dict({"where": "original"}, "privacy/meta.json")
    assert run.info.artifact_uri.startswith("mammodp-project:mlruns/")
    # MLflow's own Default experiment (id 0, never used here) is the only absolute path.
    hits = strings_containing(original / "mlflow.db", str(original))
    assert [(t, c) for t, c, _ in hits] == [("experiments", "artifact_location")], hits
    assert (original / "mlruns" / "test-local").is_dir()

    shutil.copytree(original, copy)
    shutil.rmtree(original)
    # A new process in the copy (as a command run there would be).
    script = (
        # An installed mammodp registers its artifact scheme for every MLflow process by entry point
        # (checked below); an editable install older than that entry point registers it here.
        "import sys, mlflow; from mammodp import mlflow_plugin, tracking; mlflow_plugin.register()\n"
        "rid = sys.argv[1]\n"
        "assert mlflow.artifacts.load_dict(f'runs:/{rid}/privacy/meta.json') == {'where': 'original'}\n"
        "with tracking.start_run('test-local', 'train', run_id=rid):\n"
        "    mlflow.log_dict({'where': 'copy'}, 'privacy/second.json')\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", script, run.info.run_id], cwd=copy, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (copy / "mlruns/test-local" / run.info.run_id / "artifacts/privacy/second.json").is_file()
    assert not original.exists()


def test_mlflow_processes_find_the_plugin_by_entry_point():
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    target = eps["mlflow.artifact_repository"]["mammodp-project"]
    module, cls = target.split(":")
    assert getattr(__import__(module, fromlist=[cls]), cls).__name__ == "ProjectArtifactRepository"
