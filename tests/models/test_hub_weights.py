"""`model.pretrained_weights: hf-hub:ORG/NAME` through huggingface_hub's local cache, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mammodp.models.swin import create_classifier

REV = "0123456789abcdef0123456789abcdef01234567"

SCRIPT = """
import sys, torch
from mammodp.errors import WeightsError
from mammodp.models.swin import create_classifier
try:
    m = create_classifier("swin_micro", pretrained_weights=sys.argv[1])
except WeightsError as exc:
    print("ERROR", exc); sys.exit(3)
ref = torch.load(sys.argv[2], weights_only=True)
same = all(torch.equal(m.backbone.state_dict()[k], v) for k, v in ref.items())
print("LOADED", same)
"""


def _cache_with_model(root: Path, repo: str, state: dict) -> Path:
    """A Hugging Face hub cache folder holding `repo` (laid out as huggingface_hub writes it)."""
    from safetensors.torch import save_file

    folder = root / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / REV
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REV)
    return root


def _run(weights: str, cache: Path, ref: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf-home")}
    return subprocess.run([sys.executable, "-c", SCRIPT, weights, str(ref)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_hub_model_loads_from_the_local_cache_offline(tmp_path):
    torch.manual_seed(1)
    donor = create_classifier("swin_micro")
    state = {k: v for k, v in donor.backbone.state_dict().items() if "relative_position_index" not in k
             and "attn_mask" not in k}
    cache = _cache_with_model(tmp_path / "hub", "timm/swin_micro_test.in1k", state)
    torch.save(state, tmp_path / "ref.pt")
    res = _run("hf-hub:timm/swin_micro_test.in1k", cache, tmp_path / "ref.pt")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "LOADED True" in res.stdout


def test_uncached_hub_model_offline_is_a_clear_error_naming_it(tmp_path):
    (tmp_path / "hub").mkdir()
    res = _run("hf-hub:timm/swin_tiny_patch4_window7_224.ms_in1k", tmp_path / "hub", tmp_path / "none.pt")
    assert res.returncode == 3, res.stdout + res.stderr
    line = res.stdout.strip()
    assert "timm/swin_tiny_patch4_window7_224.ms_in1k" in line and "HF_HUB_OFFLINE" in line
    assert "\n" not in line


def test_malformed_hub_name_is_refused():
    from mammodp.errors import WeightsError

    with pytest.raises(WeightsError, match="hf-hub:ORG/NAME"):
        create_classifier("swin_micro", pretrained_weights="hf-hub:just-a-name")
