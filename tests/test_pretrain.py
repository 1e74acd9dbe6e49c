"""Public pretraining: a set that shares no patient with any private or test split, trained
without DP, whose weights every regime starts from (`model.pretrained_weights`)."""

from __future__ import annotations

import dataclasses
import shutil

import pandas as pd
import pytest
import torch

from mammodp.config import load_config
from mammodp.errors import ConfigError, DataError


def _tiny_public(cfg):
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(
        cfg.pretrain, train_patients=24, test_patients=6, epochs=2, warmup_epochs=1, batch_size=16))


@pytest.fixture(scope="module")
def public_project(make_tiny_project):
    from mammodp.stages import phantom, prepare

    root = make_tiny_project("pretrain-proj", experiment="test-pretrain", train=dict(device="cpu", amp=False))
    cfg = _tiny_public(load_config(root / "params.yaml"))
    prepare.run(cfg, source="bcdr", root=root / "data/raw/bcdr", out=root / "data/prepared/bcdr")
    phantom.run_public(cfg, out=root / "data/public")
    return root, cfg


def test_the_public_set_shares_no_patient_with_any_private_or_test_split(public_project):
    root, _ = public_project
    public = pd.read_parquet(root / "data/public/prepared/manifest.parquet")
    assert set(public["split"]) == {"train", "val", "test"}
    mine = set(public["patient_id"])
    for name in ("cbis", "bcdr"):
        private = pd.read_parquet(root / f"data/prepared/{name}/manifest.parquet")
        assert len(private) and not mine & set(private["patient_id"]), name
    # ...and its images are other draws, not the private patches renumbered.
    cbis = pd.read_parquet(root / "data/prepared/cbis/manifest.parquet")
    assert len(public) != len(cbis) or not public["sample_id"].isin(cbis["sample_id"]).all()


def test_pretraining_writes_weights_every_regime_can_start_from(public_project, monkeypatch):
    from mammodp.models.swin import create_classifier
    from mammodp.stages import pretrain

    root, cfg = public_project
    monkeypatch.chdir(root)
    meta = pretrain.run(cfg, data=root / "data/public", out=root / "models/pretrain",
                        metrics_out=root / "metrics/pretrain.json", report_out=root / "reports/pretrain.json")
    assert meta["records"]["train"] > 0 and "no private record" in meta["privacy"]
    weights = root / "models/pretrain/model.pt"
    model = create_classifier(cfg.model.preset, pretrained_weights=weights, mode="frozen_backbone")
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    torch.manual_seed(0)
    fresh = create_classifier(cfg.model.preset, mode="full")
    assert any(not torch.equal(a, saved[n]) for n, a in fresh.state_dict().items())  # it trained


def test_a_public_set_holding_a_private_patient_is_refused(public_project, tmp_path, monkeypatch):
    from mammodp.stages import pretrain

    root, cfg = public_project
    monkeypatch.chdir(root)
    # A "public" set that is in fact the private CBIS import.
    shutil.copytree(root / "data/prepared/cbis", tmp_path / "leaky/prepared")
    with pytest.raises(DataError, match="shares .* patient"):
        pretrain.run(cfg, data=tmp_path / "leaky", out=tmp_path / "w", metrics_out=tmp_path / "m.json",
                     report_out=tmp_path / "r.json")
    assert not (tmp_path / "w").exists()


def test_an_offset_inside_the_private_patient_numbers_is_refused():
    from pathlib import Path

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    with pytest.raises(ConfigError, match="pretrain.patient_offset"):
        load_config(params, overrides={"pretrain.patient_offset": 100})
    assert load_config(params, overrides={"pretrain.patient_offset": 100, "pretrain.enabled": False})
