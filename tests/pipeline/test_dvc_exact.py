"""dvc.yaml lists exactly what each stage reads: its code (checked against the imports), its
params keys (checked against the config and the stage's own key lists) and its data."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "mammodp"

# Modules that shape no stage's results: the CLI, error types, file helpers, tracking (and its
# MLflow artifact plugin), the strict config loader (no defaults fill in) and runtime helpers.
# dvc.yaml does not list them.
INFRA = {"mammodp/cli.py", "mammodp/config.py", "mammodp/errors.py", "mammodp/io.py", "mammodp/tracking.py",
         "mammodp/mlflow_plugin.py", "mammodp/runtime.py", "mammodp/__init__.py", "mammodp/__main__.py"}


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "mammodp":
        return None
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def closure(path: Path) -> set[str]:
    """Repo-relative files of every mammodp module `path` imports, transitively, minus INFRA."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for name in _imports(p):
            f = module_file(name)
            if f is not None:
                todo.append(f)
                # importing a.b.c runs a/__init__.py and a/b/__init__.py too
                parts = name.split(".")
                for i in range(2, len(parts)):
                    init = module_file(".".join(parts[:i]))
                    if init is not None:
                        todo.append(init)
    rel = {str(p.relative_to(ROOT)) for p in seen}
    return {r for r in rel if r not in INFRA}


DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC["stages"]


def _stage_module(name: str, stage: dict) -> Path:
    """The stage module the command runs (`mammodp train-gan` -> stages/train_gan.py)."""
    cmd = " ".join(stage["cmd"].split())
    command = re.match(r"mammodp ([a-z-]+)", cmd).group(1)
    return ROOT / "mammodp" / "stages" / f"{command.replace('-', '_')}.py"


def _code_deps(stage: dict) -> set[str]:
    return {d for d in (x if isinstance(x, str) else next(iter(x)) for x in stage["deps"])
            if d.startswith("mammodp/")}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_are_exactly_the_imported_modules(name):
    stage = STAGES[name]
    wanted = {f for f in closure(_stage_module(name, stage)) if not f.endswith("__init__.py")}
    listed = _code_deps(stage)
    for d in listed:
        assert (ROOT / d).is_file(), f"{name}: list modules one by one, not folders ({d})"
    assert listed == wanted, (f"{name}: missing {sorted(wanted - listed)}, not imported {sorted(listed - wanted)}")


def test_params_are_leaf_keys_or_whole_sections_read_whole():
    """A section may be listed whole only if the stage reads all of it."""
    whole_ok = {"train_gan": {"gan"}, "synthesize": {"synthesize"}, "synth_quality": {"synth_quality"},
                "train_real": {"model", "dp"}, "train": {"model", "dp"}, "train_synth": {"model", "dp"}, "tune": {"model", "dp"},
                "promote": {"promote"}}
    sections = {"phantom", "data", "prepare", "validate", "model", "dp", "train", "evaluate", "gan",
                "synthesize", "synth_quality", "tune", "promote"}
    for name, stage in STAGES.items():
        for key in stage.get("params", []):
            if key in sections:
                assert key in whole_ok.get(name, set()), f"{name} lists the whole section {key}"


def test_train_cells_list_exactly_their_regimes_train_keys():
    from mammodp.stages.train import REGIME_TRAIN_KEYS

    real = {k.split(".", 1)[1] for k in STAGES["train_real"]["params"] if k.startswith("train.")}
    assert real == set(REGIME_TRAIN_KEYS["real"])
    synth = {k.split(".", 1)[1] for k in STAGES["train"]["params"] if k.startswith("train.")}
    union = set().union(*(REGIME_TRAIN_KEYS[r] for r in ("real+synth", "synth-pretrain+dp-finetune")))
    assert synth == union
    once = {k.split(".", 1)[1] for k in STAGES["train_synth"]["params"] if k.startswith("train.")}
    assert once == set(REGIME_TRAIN_KEYS["synth"]) and "epochs" not in once
    for name in ("train_real", "train", "train_synth"):
        assert "train.epsilons" not in STAGES[name]["params"], name
    # The fine-tunes start from the one synth model; the synth cell takes no budget.
    assert "models/classifier/synth" in STAGES["train"]["deps"]
    assert "epsilon" not in STAGES["train_synth"]["cmd"] and "matrix" not in STAGES["train_synth"]


def test_metrics_outputs_are_declared_apart_from_reports():
    for name, stage in STAGES.items():
        for m in stage.get("metrics", []):
            path = m if isinstance(m, str) else next(iter(m))
            assert path.startswith("metrics/"), (name, path)
        for o in stage.get("outs", []):
            path = o if isinstance(o, str) else next(iter(o))
            assert not path.startswith("metrics/"), (name, path)
