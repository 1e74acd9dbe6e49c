"""Concurrent tuning workers on one SQLite study draw different parameters; a study replayed
on a fresh storage draws the same ones."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

# A worker: opens the study like `mammodp tune`, waits until every worker has opened it (so all
# of them saw zero stored trials, the case that used to seed them alike), then adds 3 trials.
_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mammodp.config import load_config
    from mammodp.stages.tune import open_storage, open_study

    params, barrier, me, n_workers = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    cfg = load_config(params)
    study = open_study(cfg, "eps=1-test", open_storage(cfg.tune.storage))
    (barrier / me).touch()
    while len(list(barrier.iterdir())) < n_workers:
        time.sleep(0.05)

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        clip = trial.suggest_float("max_grad_norm", 0.1, 5.0, log=True)
        sigma = trial.suggest_float("noise_multiplier", 0.5, 5.0, log=True)
        return lr * clip / sigma

    study.optimize(objective, n_trials=3)
""")


def _params(tmp_path: Path, storage: str) -> Path:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["model"].update(pretrained_weights=None, mode="full")  # no pretrain stage here: random init, all trained
    p["tune"].update(storage=storage, startup_trials=2)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def _params_of(storage: str) -> list[tuple[float, float, float]]:
    import optuna

    study = optuna.load_study(study_name="eps=1-test", storage=storage)
    return [(t.params["lr"], t.params["max_grad_norm"], t.params["noise_multiplier"])
            for t in sorted(study.trials, key=lambda t: t.number)]


def test_two_worker_processes_on_one_sqlite_study_never_share_parameters(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    params = _params(tmp_path, storage)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(params), str(barrier), f"w{i}", "2"], env=env,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-2000:]
    drawn = _params_of(storage)
    assert len(drawn) == 6
    assert len(set(drawn)) == 6, drawn  # no trial repeats another (each one costs privacy)


def test_a_study_replayed_on_a_fresh_storage_draws_the_same_parameters(tmp_path):
    from mammodp.config import load_config
    from mammodp.stages.tune import open_storage, open_study

    runs = []
    for i in range(2):
        storage = f"sqlite:///{tmp_path}/optuna{i}.db"
        cfg = load_config(_params(tmp_path, storage))
        study = open_study(cfg, "eps=1-test", open_storage(storage))
        study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-2, log=True)
                       * t.suggest_float("max_grad_norm", 0.1, 5.0, log=True)
                       / t.suggest_float("noise_multiplier", 0.5, 5.0, log=True), n_trials=4)
        runs.append(_params_of(storage))
    assert runs[0] == runs[1] and len(set(runs[0])) == 4
