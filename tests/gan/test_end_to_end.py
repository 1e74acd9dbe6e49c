"""`mammodp train` on synthetic data: epsilon_total composes the classifier with its generator."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from mammodp.stages import synthesize, train, train_gan


def _cfg(cfg, gan_dp: bool):
    gan = dataclasses.replace(cfg.gan, epochs=1, dp=dataclasses.replace(cfg.gan.dp, enabled=gan_dp))
    tr = dataclasses.replace(cfg.train, epochs=1, batch_size=4, physical_batch_size=16, seeds=(0,), amp=False,
                             device="cpu")
    dp = dataclasses.replace(cfg.dp, accountant="rdp")
    return dataclasses.replace(cfg, gan=gan, train=tr, dp=dp)


def _served(run_id: str, tmp) -> str:
    """The `epsilon` field the logged pyfunc model answers for one PNG patch."""
    import base64

    import mlflow
    import pandas as pd

    from mammodp.data.imageio import save_patch
    from mammodp.stages.promote import model_uri

    save_patch(tmp / "patch.png", np.full((16, 16), 0.5))
    request = pd.DataFrame({"image": [base64.b64encode((tmp / "patch.png").read_bytes()).decode()]})
    return str(mlflow.pyfunc.load_model(model_uri(run_id)).predict(request)["epsilon"].iloc[0])


@pytest.mark.parametrize("gan_dp", [True, False], ids=["dp-generator", "non-dp-generator"])
def test_epsilon_total_composes_both_mechanisms_or_is_not_covered(gan_project, gan_dp):
    import mlflow

    root, cfg = gan_project
    cfg = _cfg(cfg, gan_dp)
    info = train_gan.run(cfg, out=root / "models/mcgan")
    synthesize.run(cfg, generator=root / "models/mcgan", out=root / "data/synthetic")
    record = json.loads((root / "data/synthetic/generator_privacy.json").read_text())
    assert record["dp"] is gan_dp

    summary = train.run(cfg, regime="real+synth", epsilon=8.0, out=root / "clf", metrics_out=root / "m.json")
    run = mlflow.get_run(summary["runs"][0]["run_id"])
    tags, params = run.data.tags, run.data.params
    meta = json.loads((root / "clf/seed=0/meta.json").read_text())
    covers = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/privacy/what_epsilon_covers.txt")
    assert "closest synthetic/training pairs" in covers and "validation split" in covers
    if gan_dp:
        # Independent composition: Opacus RDP over the classifier's run and the generator's history.
        acc = RDPAccountant()
        acc.history = [(float(params["noise_multiplier"]), float(params["sample_rate"]), int(params["steps"]))]
        acc.history += [tuple(h) for h in info["privacy"]["accountant_state"]["history"]]
        expected = acc.get_epsilon(cfg.dp.delta)
        total = float(tags["epsilon_total"])
        assert total == pytest.approx(expected, rel=1e-5)
        assert run.data.metrics["epsilon_total"] == pytest.approx(expected, rel=1e-9)
        assert total >= run.data.metrics["epsilon"] and total >= info["epsilon"] * 0.999
        assert tags["epsilon_total_method"] == "rdp" and tags["epsilon_total_status"] == "covered"
        # Both parts spend up to 8 each: the whole exceeds the run's budget of 8.
        assert tags["within_budget"] == "false" and meta["epsilon_total"] == pytest.approx(expected, rel=1e-9)
        assert "RDP composition" in covers
        assert float(_served(run.info.run_id, root)) == pytest.approx(expected, rel=1e-3)
    else:
        assert tags["epsilon_total"] == "not_covered" and "epsilon_total" not in run.data.metrics
        assert tags["within_budget"] == "false" and tags["private_data_without_dp"] == "true"
        assert meta["epsilon_total"] == "not_covered" and math.isfinite(meta["epsilon"])
        assert _served(run.info.run_id, root) == "not_covered"


def test_a_tuned_run_carries_the_studys_privacy_statement(tmp_path, gan_project):
    _, cfg = gan_project
    report = tmp_path / "eps=6.json"
    report.write_text(json.dumps({"best_params": {"lr": 0.002, "max_grad_norm": 0.5, "noise_multiplier": 1.3,
                                                  "epochs": 3},
                                  "privacy_statement": "4 trial(s) trained with DP-SGD ... (4 x 6, 4 x 0.0001)"}))
    tuned = train.load_tuned(report)
    assert train.tuning_statement(tuned).startswith("4 trial(s)") and train.tuning_statement(None) == ""
    spec = train.fit_spec(cfg, 6.0, 0, tuned)
    assert (spec.lr, spec.max_grad_norm, spec.noise_multiplier, spec.epochs) == (0.002, 0.5, 1.3, 3)
