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


def test_missing_key_is_rejected_by_name(tmp_path):
    data = _params()
    del data["train"]["epochs"]
    with pytest.raises(ConfigError, match=r"train\.epochs.*missing key"):
        load_config(_write(tmp_path, data))
    data = _params()
    del data["gan"]["dp"]["epsilon"]
    with pytest.raises(ConfigError, match=r"gan\.dp\.epsilon"):
        load_config(_write(tmp_path, data))


def test_empty_params_file_is_rejected(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="empty"):
        load_config(p)


def test_scientific_notation_is_a_number_and_overflow_is_not_infinity(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("  lr: 1.0e-3\n", "  lr: 1e-3\n", 1)
    assert "  lr: 1e-3\n" in text
    p = tmp_path / "params.yaml"
    p.write_text(text)
    assert load_config(p).train.lr == pytest.approx(1e-3)
    p.write_text(text.replace("  lr: 1e-3\n", "  lr: 1e400\n", 1))
    with pytest.raises(ConfigError, match="infinity"):
        load_config(p)
    # An override (dvc exp run -S, or a CLI) given as text is a number too.
    assert load_config(ROOT / "params.yaml", overrides={"train.lr": "5e-4"}).train.lr == pytest.approx(5e-4)


def test_lint_params_checks_every_plan():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mammodp", "lint-params", str(ROOT / "params.yaml"),
                          *map(str, sorted((ROOT / "pipelines").glob("*.yaml")))],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ok ") == 1 + len(list((ROOT / "pipelines").glob("*.yaml")))


def test_lint_params_fails_on_an_incomplete_plan(tmp_path):
    import subprocess
    import sys

    data = _params()
    del data["dp"]["delta"]
    bad = _write(tmp_path, data)
    out = subprocess.run([sys.executable, "-m", "mammodp", "lint-params", str(bad)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and "dp.delta" in out.stdout
