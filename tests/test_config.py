"""params.yaml, the config classes and dvc.yaml agree; bad keys and values are rejected by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mammodp.config import Config, ConfigError, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_load_and_cover_every_field():
    cfg = load_config(ROOT / "params.yaml")
    raw_keys = set(flatten(_params()))
    assert set(flatten(cfg)) == raw_keys, "params.yaml must spell out every config field"


@pytest.mark.parametrize("plan", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_plan_loads(plan):
    cfg = load_config(plan)
    assert cfg.plan == plan.stem


def test_dvc_params_exist_in_params_and_config():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    raw = _params()
    cfg_fields = set(flatten(Config()))
    for name, stage in dvc["stages"].items():
        for key in stage.get("params", []):
            assert isinstance(key, str), f"stage {name}: params entries are dotted keys"
            node = raw
            for part in key.split("."):
                assert part in node, f"stage {name}: params key {key} missing from params.yaml"
                node = node[part]
            assert any(f == key or f.startswith(key + ".") for f in cfg_fields), (
                f"stage {name}: params key {key} is not a config field")


def test_unknown_key_is_rejected_by_name(tmp_path):
    data = _params()
    data["train"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(_write(tmp_path, data))


def test_wrong_type_is_rejected_by_name(tmp_path):
    data = _params()
    data["train"]["epochs"] = "many"
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(_write(tmp_path, data))


def test_bad_value_is_rejected_by_name(tmp_path):
    data = _params()
    data["dp"]["privacy_unit"] = "hospital"
    with pytest.raises(ConfigError, match=r"dp\.privacy_unit"):
        load_config(_write(tmp_path, data))
    data = _params()
    data["train"]["epsilons"] = [1, -2]
    with pytest.raises(ConfigError, match=r"train\.epsilons"):
        load_config(_write(tmp_path, data))


def test_inf_budget_and_frozen(tmp_path):
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.train.epsilons[-1] == float("inf")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    assert dataclasses.replace(cfg.train, lr=0.5).lr == 0.5


def test_missing_params_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
