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


# --------------------------------------------------------------------------- ranges of every field


@pytest.mark.parametrize(("section", "key", "value", "named"), [
    ("train", "epochs", 0, r"train\.epochs: must be >= 1"),
    ("train", "physical_batch_size", 0, r"train\.physical_batch_size: must be >= 1"),
    ("train", "batch_size", 0, r"train\.batch_size: must be >= 1"),
    ("train", "pretrain_epochs", 0, r"train\.pretrain_epochs"),
    ("train", "weight_decay", -0.1, r"train\.weight_decay"),
    ("train", "synth_ratio", -1.0, r"train\.synth_ratio"),
    ("train", "seeds", [], r"train\.seeds"),
    ("train", "seeds", [0, 0], r"train\.seeds"),
    ("train", "epsilons", [1, 1], r"train\.epsilons"),
    ("train", "device", "gpu", r"train\.device"),
    ("train", "num_workers", -1, r"train\.num_workers"),
    ("train", "synthetic_regimes", ["real+synth", "synth"], r"train\.synthetic_regimes: 'synth' .* trained once"),
    ("prepare", "min_size", 0, r"prepare\.min_size"),
    ("prepare", "workers", 0, r"prepare\.workers"),
    ("prepare", "seed", -1, r"prepare\.seed"),
    ("phantom", "difficulty", 1.5, r"phantom\.difficulty"),
    ("evaluate", "ci", 1.0, r"evaluate\.ci"),
    ("evaluate", "age_bins", [0, 60, 30], r"evaluate\.age_bins"),
    ("evaluate", "fixed_threshold", 2.0, r"evaluate\.fixed_threshold"),
    ("gan", "betas", [0.5, 1.0], r"gan\.betas"),
    ("gan", "ema_decay", 1.0, r"gan\.ema_decay"),
    ("gan", "feature_matching", -1.0, r"gan\.feature_matching"),
    ("gan", "feature_matching", "inf", r"gan\.feature_matching"),
    ("promote", "max_epsilon", 0, r"promote\.max_epsilon"),
    ("serve", "max_rows", 0, r"serve\.max_rows"),
    ("serve", "max_image_pixels", 0, r"serve\.max_image_pixels"),
    ("tune", "lr", [1e-3, "inf"], r"tune\.lr"),
])
def test_every_range_is_checked_at_load_naming_the_field(tmp_path, section, key, value, named):
    data = _params()
    data[section][key] = value
    with pytest.raises(ConfigError, match=named):
        load_config(_write(tmp_path, data))


def test_top_level_seed_is_checked(tmp_path):
    data = _params()
    data["seed"] = -3
    with pytest.raises(ConfigError, match=r"^seed: a seed must be"):
        load_config(_write(tmp_path, data))


@pytest.mark.parametrize("text", ["1e400", "1.0e+400", "-1.0e+400"])
def test_a_number_that_overflows_is_not_inf_in_yaml(tmp_path, text):
    p = tmp_path / "params.yaml"
    raw = (ROOT / "params.yaml").read_text().replace("epsilons: [1, 6, inf]", f"epsilons: [1, {text}]")
    assert text in raw
    p.write_text(raw)
    with pytest.raises(ConfigError, match=r"overflows to infinity.*write inf"):
        load_config(p)


def test_literal_inf_still_means_non_private(tmp_path):
    from mammodp.config import parse_epsilon

    for literal in ("inf", ".inf", "Infinity"):
        p = tmp_path / "params.yaml"
        p.write_text((ROOT / "params.yaml").read_text().replace("epsilons: [1, 6, inf]", f"epsilons: [1, {literal}]"))
        assert load_config(p).train.epsilons[-1] == float("inf")
    assert parse_epsilon("inf") == float("inf") and parse_epsilon("2.5") == 2.5


@pytest.mark.parametrize("text", ["1e400", "-1e400", "nan", "0", "-1"])
def test_cli_epsilon_that_is_not_a_finite_positive_number_or_inf_is_refused(text):
    from mammodp.config import parse_epsilon

    with pytest.raises(ConfigError, match="epsilon"):
        parse_epsilon(text)


def test_cli_refuses_epsilon_1e400_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mammodp.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = CliRunner().invoke(app, ["train", "--regime", "real", "--epsilon", "1e400"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "too large" in lines[0] and "inf" in lines[0], result.output
    assert not (tmp_path / "models").exists()


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


def test_gan_public_warm_start_needs_a_public_set(tmp_path):
    data = _params()
    data["gan"]["dp"]["public_data"] = None
    data["gan"]["dp"]["public_epochs"] = 3
    with pytest.raises(ConfigError, match=r"gan\.dp\.public_epochs: a public warm start needs gan\.dp\.public_data"):
        load_config(_write(tmp_path, data))
    data["gan"]["dp"]["public_epochs"] = -1
    with pytest.raises(ConfigError, match=r"gan\.dp\.public_epochs"):
        load_config(_write(tmp_path, data))


@pytest.mark.parametrize("key, value", [("lr", 0.0), ("momentum", 1.0), ("momentum", -0.1), ("optimizer", "rmsprop"),
                                        ("betas", [0.5, 1.0]), ("betas", [-0.1, 0.9])])
def test_gan_dp_discriminator_optimiser_settings_are_checked(tmp_path, key, value):
    data = _params()
    data["gan"]["dp"][key] = value
    with pytest.raises(ConfigError, match=rf"gan\.dp\.{key}"):
        load_config(_write(tmp_path, data))
