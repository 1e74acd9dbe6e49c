"""The shared store: an MLflow server on a real PostgreSQL with proxied artifacts.

A train run, its promotion and `mlflow models serve` of the champion all go through the
server; the store holds no local path of the client; two concurrent `mammodp tune` workers on
one PostgreSQL study finish exactly their trials, none duplicated or lost, each trial a
nested run under the one study run on the server.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
NAME = "mammodp-classifier"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(make_tiny_project, server) -> Path:
    return make_tiny_project(
        "shared-proj", experiment="test-shared",
        train=dict(epochs=2, batch_size=8, physical_batch_size=16, epsilons=[1], seeds=[0], device="cpu",
                   amp=False),
        dp=dict(accountant="rdp", per_sample_method="hooks", delta=1e-3),
        tune=dict(n_trials=2, storage=server["optuna_storage"], max_epochs=1, noise_multiplier=[0.3, 4.0],
                  startup_trials=4, pruner_startup_trials=1, pruner_warmup_epochs=0),
        promote=dict(max_epsilon=6.0, model_name=NAME),
    )


def env_for(server) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": server["tracking_uri"],
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def pg_dump(server, database: str) -> str:
    from mammodp.server import PG_USER, find_pg_bin

    port = server["backend_store_uri"].rsplit(":", 1)[1].split("/")[0]
    return subprocess.run([str(find_pg_bin() / "pg_dump"), "-h", "127.0.0.1", "-p", port, "-U", PG_USER, database],
                          capture_output=True, text=True, check=True).stdout


def test_train_promote_and_serve_through_the_server(server, project, monkeypatch):
    import mlflow
    import requests
    from PIL import Image

    from mammodp.config import load_config
    from mammodp.data.imageio import to_uint16
    from mammodp.stages import promote, train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["tracking_uri"])
    monkeypatch.chdir(project)
    cfg = load_config(project / "params.yaml")
    summary = train.run(cfg, regime="real", epsilon=1.0)
    run_id = summary["runs"][0]["run_id"]
    record = promote.run(cfg, out=Path("metrics/promote.json"))
    assert record["champion"]["run_id"] == run_id

    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(NAME, "champion").run_id == run_id
    assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
    # The shared store holds no path of this client: not the project, not a file: URI.
    dump = pg_dump(server, "mlflow")
    assert str(project) not in dump and "file://" not in dump
    # ...and the artifacts live where the server put them, not in the project.
    assert not (project / "mlruns").exists()
    assert any((server["root"] / "artifacts").rglob("MLmodel"))

    # Serving by alias through the server, as the README's command does.
    port = free_port()
    serve = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
                              "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                             env=env_for(server), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert serve.poll() is None, serve.stderr.read().decode()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        buf = io.BytesIO()
        Image.fromarray(to_uint16(np.full((32, 32), 0.5, np.float32))).save(buf, format="PNG")
        payload = {"dataframe_records": [{"image": base64.b64encode(buf.getvalue()).decode()}]}
        res = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60)
        assert res.status_code == 200, res.text
        pred = res.json()["predictions"][0]
        assert 0.0 <= pred["p_malignant"] <= 1.0 and pred["epsilon"] != "unknown"
    finally:
        os.killpg(serve.pid, 15)
        serve.wait(timeout=60)


def test_two_tune_workers_share_one_postgres_study(server, project, runs_in):
    import optuna

    env = env_for(server)
    workers = [subprocess.Popen([str(BIN / "mammodp"), "tune", "--epsilon", "8", "--out", f"metrics/tune-w{i}.json",
                                 "--report", f"reports/tune-w{i}.json"], cwd=project, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [w.communicate(timeout=1200)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outs)

    reports = [json.loads((project / f"reports/tune-w{i}.json").read_text()) for i in range(2)]
    assert reports[0]["study_name"] == reports[1]["study_name"]
    assert reports[0]["storage"].startswith("postgresql://")
    study = optuna.load_study(study_name=reports[0]["study_name"], storage=server["optuna_storage"])
    trials = study.get_trials(deepcopy=False)
    # 2 workers x tune.n_trials = 4 trials: none lost, none left running, none duplicated.
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials), [t.state for t in trials]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4

    parents = runs_in(server["tracking_uri"], "test-shared",
                      f"tags.stage = 'tune' and tags.study_name = '{study.study_name}'")
    assert len(parents) == 1, "both workers log under one study run"
    nested = runs_in(server["tracking_uri"], "test-shared", f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(int(r.data.tags["trial"]) for r in nested) == [0, 1, 2, 3]
    assert {reports[0]["mlflow_run_id"], reports[1]["mlflow_run_id"]} == {parents[0].info.run_id}
