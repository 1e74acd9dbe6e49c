"""Concurrent runs logging the same dataset to one shared store (a 2-job DVC queue, torchrun
ranks, Optuna workers): MLflow's SQL store looks the dataset up and inserts it in one
transaction, so two clients that both miss it race on the `dataset_pk` unique key and the loser
gets BAD_REQUEST. `tracking.log_dataset` must absorb that race: every run ends up linked to the
one shared dataset row. CI once failed a queued training cell on exactly this."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WORKER = textwrap.dedent("""
    import sys, time
    import mlflow
    import pandas as pd
    from mammodp import tracking

    uri, experiment, start, tag = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    mlflow.set_tracking_uri(uri)
    exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
    rows = pd.DataFrame({"sample_id": [f"{tag}-{i}" for i in range(20)], "label": [i % 2 for i in range(20)]})
    with mlflow.start_run(experiment_id=exp_id):
        time.sleep(max(0.0, start - time.time()))
        tracking.log_dataset(rows, "data/prepared/cbis/manifest.parquet", name="cbis-train", context="training")
""")


def test_concurrent_runs_log_one_dataset_without_losing_a_run(server, tmp_path, runs_in):
    import mlflow

    uri = server["tracking_uri"]
    experiment = "test-concurrent-inputs"
    mlflow.MlflowClient(tracking_uri=uri).create_experiment(experiment)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    n_workers, rounds = 6, 4
    for r in range(rounds):  # a fresh dataset (new digest) per round: every round races on its insert
        start = time.time() + 12.0  # all workers are up and inside their runs before this instant
        procs = [subprocess.Popen([sys.executable, str(script), uri, experiment, str(start), f"round{r}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(n_workers)]
        outs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
        failed = [out for rc, out in outs if rc != 0]
        assert not failed, f"round {r}: {len(failed)} of {n_workers} workers failed:\n{failed[0][-3000:]}"

    runs = runs_in(uri, experiment)
    assert len(runs) == n_workers * rounds
    for run in runs:
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["cbis-train"]
    # One dataset row per round, shared by that round's runs (not one per run).
    digests = {run.inputs.dataset_inputs[0].dataset.digest for run in runs}
    assert len(digests) == rounds
