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
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
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


@pytest.mark.parametrize(("private", "ema", "fm"),
                         [(False, 0.0, 0.0), (True, 0.0, 0.0), (False, 0.9, 0.0), (True, 0.9, 0.0), (False, 0.9, 2.0)],
                         ids=["non-private", "dp", "non-private-ema", "dp-ema", "non-private-ema-fm"])
def test_resume_continues_training_and_accountant(gan_project, monkeypatch, private, ema, fm):
    root, cfg = gan_project
    cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, ema_decay=ema, feature_matching=fm))
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


@pytest.mark.parametrize("d_stem", [False, True], ids=["no-stem", "stem"])
def test_dp_training_reports_epsilon_within_target(gan_project, d_stem):
    from opacus.accountants import RDPAccountant

    root, cfg = gan_project
    cfg = _dp(dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, d_stem=d_stem)))
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
    # Adam's betas shape the saved optimiser state: a changed setting is another run.
    for gan in (dataclasses.replace(one.gan, betas=(0.0, 0.99)),
                dataclasses.replace(one.gan, dp=dataclasses.replace(one.gan.dp, betas=(0.0, 0.99)))):
        with pytest.raises(ConfigError, match=r"gan\.(dp\.)?betas"):
            train_gan.run(dataclasses.replace(cfg, gan=gan), out=root / "m", resume=True)


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


@pytest.mark.parametrize("bad_step", [6, 8], ids=["inside-epoch-2", "last-of-epoch-2"])
def test_non_finite_loss_stops_training_and_keeps_the_last_good_generator(gan_project, monkeypatch, bad_step):
    root, cfg = gan_project
    real = mcgan.generator_step
    calls = {"n": 0}

    def step(G, *args, **kwargs):
        calls["n"] += 1
        out = real(G, *args, **kwargs)
        if calls["n"] != bad_step:
            return out
        with torch.no_grad():  # the generator itself diverged
            for p in G.parameters():
                p.fill_(float("nan"))
        return out | {"loss_g": torch.tensor(float("nan"))}

    monkeypatch.setattr(mcgan, "generator_step", step)
    info = train_gan.run(cfg, out=root / "m")
    # 4 steps an epoch; a step's values are read once the next is queued: one step more runs
    # when the bad one is not the epoch's last
    assert info["epochs"] == 1 and any(f"became nan at epoch 2, step {bad_step};" in w for w in info["warnings"])
    assert info["steps"] == min(bad_step + 1, 8)
    G, _ = mcgan.load_generator(root / "m/generator.pt")
    assert all(torch.isfinite(p).all() for p in G.state_dict().values())


# --------------------------------------------------------------------------- DP through the engine


def _batches(engine, k=6):
    return [tuple(engine.sample_batch().tolist()) for _ in range(k)]


def _engine(cfg, unit="patch"):
    import torch

    images, labels, records = train_gan.load_training_images(cfg, unit)
    cfg = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, privacy_unit=unit))
    _, D, _ = mcgan.create_gan(image_size=cfg.gan.image_size, latent_dim=cfg.gan.latent_dim, width=cfg.gan.width,
                               dp=True)
    return train_gan.make_dp_discriminator(D, torch.optim.Adam(D.parameters()), cfg, records, "cpu")


def test_dp_gan_sampling_and_noise_are_os_seeded_unless_reproducible(gan_project):
    _, cfg = gan_project
    secret = _dp(cfg)
    a, b = _engine(secret), _engine(secret)
    assert not a.summary()["noise_seeded"]
    assert _batches(a) != _batches(b)  # same params, different (secret) batches
    rep = _dp(cfg, reproducible_noise=True)
    c, d = _engine(rep), _engine(rep)
    assert c.summary()["noise_seeded"] and _batches(c) == _batches(d)
    assert a.summary()["per_sample_method"] == "vmap" and a.expected_batch_size == cfg.gan.batch_size


def test_dp_gan_groups_a_patients_patches_into_one_record(gan_project):
    root, cfg = gan_project
    path = root / "data/prepared/cbis/manifest.parquet"
    df = pd.read_parquet(path)
    train = df["split"] == "train"
    df.loc[train, "patient_id"] = [f"P{i // 2}" for i in range(int(train.sum()))]  # two patches each
    df.to_parquet(path, index=False)
    engine = _engine(_dp(cfg), unit="patient")
    assert engine.sampler.n_records == 8 and engine.privacy_unit == "patient"
    records = engine.sampler.record_of_sample
    for batch in _batches(engine, 20):
        chosen = set(records[list(batch)].tolist())
        assert sorted(batch) == sorted(i for i in range(16) if records[i] in chosen)  # whole patients only

    cfg = dataclasses.replace(_dp(cfg), dp=dataclasses.replace(cfg.dp, privacy_unit="patient"),
                              gan=dataclasses.replace(_dp(cfg).gan, epochs=1))
    info = train_gan.run(cfg, out=root / "patient")
    assert info["privacy"]["privacy_unit"] == "patient" and info["privacy"]["n_records"] == 8


def test_dp_checkpoint_is_plain_data_without_secret_rng_state(gan_project):
    import torch

    root, cfg = gan_project
    cfg = _dp(cfg)
    info = train_gan.run(cfg, out=root / "dp")
    ckpt = torch.load(root / "dp/checkpoint.pt", map_location="cpu", weights_only=True)  # no pickle
    assert ckpt["dp"]["noise_generator"] is None  # OS-seeded noise is never saved
    assert ckpt["dp"]["sampler"]["generator"] is None  # nor the secret Poisson sampler's state
    assert ckpt["dp"]["accountant"]["history"] == [list(h) for h in info["privacy"]["accountant_state"]["history"]]
    torch.load(root / "dp/generator.pt", map_location="cpu", weights_only=True)
    record = json.loads((root / "dp/gan.json").read_text())["privacy"]
    assert record["dp"] and record["accountant_state"]["history"][0][2] == info["steps"]
    assert record["privacy_unit"] == "patch" and record["noise_seeded"] is False
    # Nothing computed on real batches is logged under DP: no discriminator loss, no D(real).
    import mlflow

    run = mlflow.get_run(info["run_id"])
    assert not {"loss_d", "d_real", "loss_d_real", "epoch_loss_d"} & set(run.data.metrics)
    assert "loss_g" in run.data.metrics and "sample_diversity_benign" in run.data.metrics
    assert pd.read_csv(root / "dp/history.csv")["loss_d"].isna().all()
    # A secret run resumes (fresh OS-seeded batches and noise) and keeps counting the same accountant.
    with pytest.MonkeyPatch.context() as m:
        _crash_after(m, info["steps"] // 2 + 1)  # dies in epoch 2, after the epoch-1 checkpoint
        with pytest.raises(KeyboardInterrupt):
            train_gan.run(cfg, out=root / "resumed")
    resumed = train_gan.run(cfg, out=root / "resumed", resume=True)
    assert resumed["privacy"]["steps"] == info["privacy"]["steps"]
    assert resumed["epsilon"] == pytest.approx(info["epsilon"], rel=1e-12)


def test_non_private_checkpoint_loads_without_pickle(gan_project):
    import torch

    root, cfg = gan_project
    cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, epochs=1))
    train_gan.run(cfg, out=root / "m")
    ckpt = torch.load(root / "m/checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["dp"] is None and ckpt["epoch"] == 1


def test_dp_gan_public_warm_start_trains_on_public_data_only_and_says_so(gan_project, public_set):
    root, cfg = gan_project
    folder = public_set()
    base = _dp(cfg, reproducible_noise=True)
    cold = train_gan.run(base, out=root / "cold")
    warm_cfg = _dp(cfg, reproducible_noise=True, public_data=folder, public_epochs=2)
    warm = train_gan.run(warm_cfg, out=root / "warm")

    # The warm start changed the networks; the DP phase and its accounting did not change.
    a, _ = mcgan.load_generator(root / "cold/generator.pt")
    b, _ = mcgan.load_generator(root / "warm/generator.pt")
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert warm["privacy"]["steps"] == cold["privacy"]["steps"] == warm["steps"]
    assert warm["epsilon"] == pytest.approx(cold["epsilon"], rel=1e-12)
    pub = warm["public_data"]
    assert pub["n_images"] == 20 and pub["epochs"] == 2 and len(pub["history"]) == 2  # every split: all public
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in pub["history"])
    assert cold["public_data"] is None

    import mlflow

    run = mlflow.get_run(warm["run_id"])
    assert run.data.tags["public_warm_start_epochs"] == "2"
    assert "n=20" in run.data.tags["public_data"] and pub["manifest_hash"] in run.data.tags["public_data"]
    assert len(mlflow.MlflowClient().get_metric_history(warm["run_id"], "public_epoch_loss_d")) == 2
    statement = mlflow.artifacts.load_text(f"runs:/{warm['run_id']}/privacy/what_epsilon_covers.txt")
    assert "outside what epsilon covers" in statement and "warm start" in statement


def test_dp_gan_public_set_sharing_a_patient_is_refused(gan_project, public_set):
    root, cfg = gan_project
    folder = public_set("cbis-ddsm")  # same patient ids as the private CBIS set
    with pytest.raises(DataError, match="shares .* patient"):
        train_gan.run(_dp(cfg, public_data=folder, public_epochs=1), out=root / "bad")
    with pytest.raises(DataError, match="names no prepared public set"):
        train_gan.run(_dp(cfg, public_data="data/nowhere", public_epochs=1), out=root / "none")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_dp_discriminator_optimiser_follows_params(gan_project, optimizer):
    root, cfg = gan_project
    # Non-private gan.betas differ from gan.dp.betas: a DP run must use the latter.
    cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, betas=(0.0, 0.99)))
    cfg = _dp(cfg, optimizer=optimizer, lr=0.3, momentum=0.5, betas=(0.4, 0.95))
    train_gan.run(cfg, out=root / optimizer)
    ckpt = torch.load(root / optimizer / "checkpoint.pt", map_location="cpu", weights_only=True)
    group = ckpt["opt_d"]["param_groups"][0]
    state = next(iter(ckpt["opt_d"]["state"].values()))
    if optimizer == "sgd":  # gan.dp.lr / momentum: SGD on the noised clipped mean
        assert group["lr"] == 0.3 and group["momentum"] == 0.5 and "momentum_buffer" in state
    else:  # Adam with gan.lr and the DP betas
        assert group["lr"] == cfg.gan.lr and "exp_avg" in state and tuple(group["betas"]) == (0.4, 0.95)
    # The generator keeps Adam either way (it never sees private data), with gan.dp.betas.
    assert "exp_avg" in next(iter(ckpt["opt_g"]["state"].values()))
    assert tuple(ckpt["opt_g"]["param_groups"][0]["betas"]) == (0.4, 0.95)


def test_non_private_gan_uses_gan_betas(gan_project):
    root, cfg = gan_project
    cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, betas=(0.0, 0.99), epochs=1))
    assert not cfg.gan.dp.enabled and cfg.gan.dp.betas != (0.0, 0.99)
    train_gan.run(cfg, out=root / "plain")
    ckpt = torch.load(root / "plain" / "checkpoint.pt", map_location="cpu", weights_only=True)
    for opt in ("opt_g", "opt_d"):
        assert tuple(ckpt[opt]["param_groups"][0]["betas"]) == (0.0, 0.99), opt


def test_saved_generator_is_the_moving_average_of_the_iterates(gan_project, monkeypatch):
    root, cfg = gan_project
    decay = 0.8
    cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, ema_decay=decay))
    iterates = []
    real = mcgan.generator_step

    def step(G, *args, **kwargs):
        stats = real(G, *args, **kwargs)
        iterates.append({k: v.detach().clone() for k, v in G.named_parameters()})
        return stats

    monkeypatch.setattr(mcgan, "generator_step", step)
    start = {}
    real_ema = mcgan.GeneratorEMA

    def ema(G, d):  # the weights the average starts from
        start.update({k: v.detach().clone() for k, v in G.named_parameters()})
        return real_ema(G, d)

    monkeypatch.setattr(mcgan, "GeneratorEMA", ema)
    info = train_gan.run(cfg, out=root / "m")
    assert info["ema_decay"] == decay and len(iterates) == info["steps"] > 2
    saved, _ = mcgan.load_generator(root / "m/generator.pt")
    for name, p in saved.named_parameters():
        expect = start[name]
        for it in iterates:
            expect = decay * expect + (1 - decay) * it[name]
        torch.testing.assert_close(p, expect, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(p, iterates[-1][name])  # not the last iterate
    # Its BatchNorm statistics are its own (recollected), not the live generator's.
    live = torch.load(root / "m/checkpoint.pt", weights_only=True)["G"]
    stats = [k for k in live if k.endswith("running_mean")]
    assert stats and all(not torch.equal(saved.state_dict()[k], live[k]) for k in stats)


def test_non_private_gan_trains_on_the_public_set_when_asked_and_says_so(gan_project, public_set):
    root, cfg = gan_project
    folder = public_set()
    gan = dataclasses.replace(cfg.gan, train_on_public=True, batch_size=4,
                              dp=dataclasses.replace(cfg.gan.dp, public_data=folder))
    mixed = train_gan.run(dataclasses.replace(cfg, gan=gan), out=root / "mixed")
    plain = train_gan.run(cfg, out=root / "plain")
    # 16 private + 20 public patches at batch 4: 9 steps an epoch instead of 4.
    assert plain["steps"] == 2 * 4 and mixed["steps"] == 2 * 9
    assert mixed["trained_on"]["n_images"] == 16 and mixed["public_data"]["n_images"] == 20
    assert mixed["public_data"]["use"] == "training data" and plain["public_data"] is None

    import mlflow

    run = mlflow.get_run(mixed["run_id"])
    assert run.data.tags["private_data_without_dp"] == "true"
    assert "n=20" in run.data.tags["public_data"] and "training data" in run.data.tags["public_data"]
    assert run.data.params["n_train"] == "36"
    statement = mlflow.artifacts.load_text(f"runs:/{mixed['run_id']}/privacy/what_epsilon_covers.txt")
    assert "NOT private" in statement and "joined the real training patches" in statement
    # A public set that shares a patient with the private splits is refused here too.
    public_set("cbis-ddsm")
    with pytest.raises(DataError, match="patient"):
        train_gan.run(dataclasses.replace(cfg, gan=gan), out=root / "bad")


def test_train_on_public_needs_a_public_set():
    from pathlib import Path

    from mammodp.config import load_config

    params = Path(__file__).resolve().parents[2] / "params.yaml"
    with pytest.raises(ConfigError, match=r"gan\.train_on_public"):
        load_config(params, {"gan.train_on_public": True, "gan.dp.public_data": None, "gan.dp.public_epochs": 0})
    assert load_config(params, {"gan.train_on_public": True}).gan.train_on_public


@pytest.mark.parametrize("private", [False, True], ids=["non-private", "dp"])
def test_feature_matching_reads_real_batches_only_without_dp(gan_project, monkeypatch, private):
    root, cfg = gan_project
    lam = 3.0
    cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, feature_matching=lam))
    if private:
        cfg = _dp(cfg)
    calls = []
    real_step = mcgan.generator_step

    def step(*args, **kwargs):
        calls.append((kwargs.get("real"), kwargs.get("feature_matching", 0.0)))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(mcgan, "generator_step", step)
    info = train_gan.run(cfg, out=root / "fm")
    assert len(calls) == info["steps"] > 0

    import mlflow

    client = mlflow.MlflowClient()
    if private:  # the generator step stays post-processing: no real patch reaches it
        assert all(real is None for real, _ in calls)
        assert client.get_metric_history(info["run_id"], "epoch_loss_fm") == []
        return
    assert all(real is not None and real.shape[0] > 0 and w == lam for real, w in calls)
    assert [m.step for m in client.get_metric_history(info["run_id"], "epoch_loss_fm")] == [1, 2]
    assert mlflow.get_run(info["run_id"]).data.params["gan.feature_matching"] == str(lam)
    monkeypatch.setattr(mcgan, "generator_step", real_step)
    plain = train_gan.run(dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, feature_matching=0.0)),
                          out=root / "plain")
    a, _ = mcgan.load_generator(root / "fm/generator.pt")
    b, _ = mcgan.load_generator(root / "plain/generator.pt")
    assert plain["steps"] == info["steps"]
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # A checkpoint continues only the loss it was trained with.
    other = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, feature_matching=1.0))
    with pytest.raises(ConfigError, match=r"gan\.feature_matching"):
        train_gan.run(other, out=root / "fm", resume=True)


def _from_torch_optim() -> bool:
    """Called from torch.optim: Adam reads its step count, a host tensor also on CUDA (not
    `capturable`), which is no wait for the device."""
    import sys

    f = sys._getframe(2)
    while f is not None:
        if "torch/optim/" in f.f_code.co_filename.replace("\\", "/"):
            return True
        f = f.f_back
    return False


@pytest.mark.parametrize("case", ["non-private", "dp", "dp-public-warm-start"])
def test_gan_steps_read_no_value_back_and_the_loop_reads_each_step_once_the_next_is_queued(
        gan_project, public_set, monkeypatch, case):
    """On CUDA, reading a value (float(), .item(), .tolist() ...) makes the host wait for every
    queued kernel. A GAN step (its draws, copies, the discriminator's private or plain step and
    the generator's; the public warm start's too) reads nothing; the loop reads a step's
    statistics, in one read, only once the next step is queued, so the host prepares a step
    while the device runs the last; each step is logged once, at its own step number."""
    root, cfg = gan_project
    if case == "dp":
        cfg = _dp(cfg)
    elif case == "dp-public-warm-start":
        cfg = _dp(cfg, public_data=public_set(), public_epochs=2)
    events: list[tuple[str, int]] = []
    state = {"kind": None, "count": {}, "queued": 0, "ids": {}, "alive": [], "warm": False, "warm_reads": 0}
    real_draw, real_disc = mcgan.draw_per_sample, mcgan.discriminator_step
    real_gen, real_read = mcgan.generator_step, mcgan.read_stats

    def begins(kind, real):  # a step begins: a private one by its draws, a plain one by D's step
        def wrapped(*args, **kwargs):
            state["kind"] = kind
            state["count"][kind] = state["count"].get(kind, 0) + 1
            return real(*args, **kwargs)
        return wrapped

    def gen(*args, **kwargs):  # and ends
        out = real_gen(*args, **kwargs)
        state["kind"] = None
        state["queued"] += 1
        state["ids"][id(out["loss_g"])] = state["queued"]
        state["alive"].append(out["loss_g"])  # kept alive: no later tensor may reuse its id
        events.append(("queued", state["queued"]))
        return out

    def read(stats):
        if "loss_g" in stats and id(stats["loss_g"]) in state["ids"]:
            events.append(("read", state["ids"][id(stats["loss_g"])]))
        return real_read(stats)

    def refuse(name, original):
        def wrapped(self, *args, **kwargs):
            # the first step of a kind may read (the engine checks its route once against vmap)
            kind = state["kind"]
            if kind is not None and state["count"][kind] > 1 and not _from_torch_optim():
                raise AssertionError(f"a GAN step read a value back: Tensor.{name} of {tuple(self.shape)}")
            if kind is None and state["warm"] and self.is_floating_point():  # not the loader's indices
                state["warm_reads"] += 1
            return original(self, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(mcgan, "draw_per_sample", begins("private", real_draw))
    monkeypatch.setattr(mcgan, "discriminator_step", begins("plain", real_disc))
    monkeypatch.setattr(mcgan, "generator_step", gen)
    monkeypatch.setattr(mcgan, "read_stats", read)
    real_warm = train_gan._public_warm_start

    def warm(*args, **kwargs):
        state["warm"] = True
        try:
            return real_warm(*args, **kwargs)
        finally:
            state["warm"] = False

    monkeypatch.setattr(train_gan, "_public_warm_start", warm)
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name, getattr(torch.Tensor, name)))
    info = train_gan.run(cfg, out=root / "m")
    n = info["steps"]
    assert n == 8
    if case == "dp-public-warm-start":
        assert state["count"]["plain"] > 1 and info["public_data"]["epochs"] == 2  # the warm start ran
        assert state["warm_reads"] == 2  # between its steps: its losses read once an epoch, not once a step
    first = state["queued"] - n + 1  # the training loop's steps (after any warm start's)
    reads = [k for kind, k in events if kind == "read"]
    assert reads == list(range(first, first + n))  # every step read once, in order
    for k in reads:
        at = events.index(("read", k))
        # read after the next step was queued, except an epoch's last step (read at its end)
        assert ("queued", k + 1) in events[:at] or (k - first + 1) % 4 == 0, (k, events)
    import mlflow

    logged = mlflow.MlflowClient().get_metric_history(info["run_id"], "loss_g")
    assert sorted(m.step for m in logged) == list(range(1, n + 1))  # once each, at its own step
