"""`train-gan` on tiny phantom-like data: finite losses, checkpoints, resume, DP accounting."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mammodp.errors import ConfigError, DataError
from mammodp.models import mcgan
from mammodp.stages import train_gan


def _dp(cfg, **kw):
    dp = dataclasses.replace(cfg.gan.dp, enabled=True, **kw)
    return dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, dp=dp))


def test_tiny_training_is_finite_and_checkpoint_reloads_to_identical_samples(gan_project):
    root, cfg = gan_project
    out = root / "models/mcgan"
    info = train_gan.run(cfg, out=out)
    assert info["epsilon"] == "non-private" and info["epochs"] == 2
    assert info["trained_on"]["split"] == "train" and info["trained_on"]["n_images"] == 16
    assert len(info["trained_on"]["manifest_hash"]) == 16
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 2
    assert np.isfinite(history[["loss_d", "loss_g"]].to_numpy()).all()
    assert json.loads((out / "gan.json").read_text())["run_id"] == info["run_id"]
    for epoch in (1, 2):
        for cls in ("benign", "malignant"):
            assert (out / f"samples/epoch-{epoch:04d}-{cls}.png").is_file()

    labels = np.array([0, 1] * 4)
    G1, meta = mcgan.load_generator(out / "generator.pt")
    G2, _ = mcgan.load_generator(out / "generator.pt")
    a = mcgan.sample(G1, labels, seed=11)
    np.testing.assert_array_equal(a, mcgan.sample(G2, labels, seed=11))
    assert meta["run_id"] == info["run_id"]
    # The last training checkpoint holds the same generator.
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    G3 = mcgan.Generator(mcgan.GanSpec(**ckpt["spec"]))
    G3.load_state_dict(ckpt["G"])
    np.testing.assert_array_equal(a, mcgan.sample(G3, labels, seed=11))

    import mlflow

    run = mlflow.get_run(info["run_id"])
    assert run.data.tags["epsilon"] == "inf" and run.data.tags["final_epsilon"] == "non-private"
    steps = mlflow.MlflowClient().get_metric_history(info["run_id"], "loss_d")
    assert len(steps) == info["steps"] == 8  # 16 images / batch 4 = 4 steps per epoch
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(info["run_id"], "samples")}
    assert "samples/epoch-0002-malignant.png" in arts


def _crash_after(monkeypatch, n_calls):
    """Make the n-th generator step raise, as a killed run would stop."""
    real = mcgan.generator_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n_calls:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(mcgan, "generator_step", step)


@pytest.mark.parametrize("private", [False, True], ids=["non-private", "dp"])
def test_resume_continues_training_and_accountant(gan_project, monkeypatch, private):
    root, cfg = gan_project
    if private:
        cfg = _dp(cfg, reproducible_noise=True)  # so that two runs can be compared bit for bit
    full = train_gan.run(cfg, out=root / "full")
    steps_per_epoch = full["steps"] // 2

    with monkeypatch.context() as m:
        _crash_after(m, steps_per_epoch + 1)  # dies inside epoch 2, after the epoch-1 checkpoint
        with pytest.raises(KeyboardInterrupt):
            train_gan.run(cfg, out=root / "resumed")
    assert not (root / "resumed/generator.pt").exists()
    resumed = train_gan.run(cfg, out=root / "resumed", resume=True)

    assert resumed["steps"] == full["steps"] and resumed["epochs"] == 2
    a, _ = mcgan.load_generator(root / "full/generator.pt")
    b, _ = mcgan.load_generator(root / "resumed/generator.pt")
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=k)
    assert len(pd.read_csv(root / "resumed/history.csv")) == 2
    if private:
        assert resumed["privacy"]["steps"] == full["privacy"]["steps"] == full["steps"]
        assert resumed["epsilon"] == pytest.approx(full["epsilon"], rel=1e-12)


def test_dp_training_reports_epsilon_within_target(gan_project):
    from opacus.accountants import RDPAccountant

    root, cfg = gan_project
    cfg = _dp(cfg)
    info = train_gan.run(cfg, out=root / "dp")
    priv = info["privacy"]
    assert 0 < info["epsilon"] <= cfg.gan.dp.epsilon
    assert priv["accountant"] == "rdp" and priv["delta"] == cfg.gan.dp.delta and priv["steps"] == info["steps"]
    # An independent accountant over the same mechanism agrees.
    acc = RDPAccountant()
    acc.history = [(priv["noise_multiplier"], priv["sample_rate"], priv["steps"])]
    assert acc.get_epsilon(cfg.gan.dp.delta) == pytest.approx(info["epsilon"], rel=1e-9)
    assert json.loads((root / "dp/gan.json").read_text())["epsilon"] == pytest.approx(info["epsilon"])

    import mlflow

    client = mlflow.MlflowClient()
    eps = client.get_metric_history(info["run_id"], "epsilon")
    assert [m.step for m in eps] == [1, 2] and eps[0].value < eps[1].value
    for key in ("noise_multiplier", "dp_steps", "delta"):
        assert len(client.get_metric_history(info["run_id"], key)) == 2
    assert mlflow.get_run(info["run_id"]).data.tags["accountant"] == "rdp"


def test_resume_refuses_other_params_and_missing_checkpoint(gan_project):
    root, cfg = gan_project
    with pytest.raises(DataError, match="checkpoint.pt"):
        train_gan.run(cfg, out=root / "none", resume=True)
    one = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, epochs=1))
    train_gan.run(one, out=root / "m")
    wider = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, width=8))
    with pytest.raises(ConfigError, match="gan.width"):
        train_gan.run(wider, out=root / "m", resume=True)


def test_missing_manifest_is_a_named_error(gan_project):
    root, cfg = gan_project
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prepared_dir="nowhere"))
    with pytest.raises(DataError, match="nowhere"):
        train_gan.run(cfg, out=root / "m")


def test_diverging_loss_is_detected_and_logged(gan_project, caplog):
    root, cfg = gan_project
    cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, epochs=1, diverge_loss=1e-3))
    info = train_gan.run(cfg, out=root / "m")
    assert any(w.startswith("diverging_loss") for w in info["warnings"])
    assert "diverging_loss" in caplog.text
    import mlflow

    assert any(k.startswith("warning.") for k in mlflow.get_run(info["run_id"]).data.tags)
    assert math.isfinite(pd.read_csv(root / "m/history.csv")["loss_d"].iloc[0])


def test_non_finite_loss_stops_training_and_keeps_the_last_good_generator(gan_project, monkeypatch):
    root, cfg = gan_project
    real = mcgan.generator_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return {"loss_g": float("nan")} if calls["n"] == 6 else out  # inside epoch 2

    monkeypatch.setattr(mcgan, "generator_step", step)
    info = train_gan.run(cfg, out=root / "m")
    assert info["epochs"] == 1 and any("became nan" in w for w in info["warnings"])
    G, _ = mcgan.load_generator(root / "m/generator.pt")
    assert all(torch.isfinite(p).all() for p in G.state_dict().values())
