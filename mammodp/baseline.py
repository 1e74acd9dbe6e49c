"""The classical baseline `radiomics-linear`: logistic regression on radiomics features.

Tramèr & Boneh (ICLR 2021) show that handcrafted features with a linear DP model beat
end-to-end DP networks at small data; this is that baseline for mammography patches.

- Features (`radiomics_features`): pyradiomics first-order, texture (GLCM, GLRLM, GLSZM,
  GLDM, NGTDM) and 2-D shape features inside a lesion mask segmented from the patch itself
  (`lesion_mask`: Otsu threshold of the smoothed patch, the connected component at the
  centre). Manifests carry no lesion mask, and a whole-patch mask would make every shape
  feature a constant. Grey levels are a fixed bin count (`bin_count`), robust at 32-128 px.
  Pure and deterministic: a patch's features depend on that patch alone.
- Standardisation (`Standardiser`): mean and standard deviation of PUBLIC patches only
  (`check_public` refuses private training/validation records and synthetic data); it is
  part of the model (`LinearBaseline` buffers), so evaluation and serving apply exactly the
  training-time statistics. No private statistic enters it, so it costs no budget.
- The model (`LinearBaseline`): standardise, then one `nn.Linear(F, 2)`. Non-private:
  scikit-learn's `LogisticRegression` (`fit_logistic`), copied into the same module.
  Private: DP-SGD on that module through `mammodp.training.fit` (so `make_private`, Poisson
  sampling and the accountant of every other run), then reduced to the same logistic form
  (`to_logistic`: class-0 row zero), so both budgets store the same kind of model.

The module takes its inputs as (N, 1, 1, F) float32 "images" of features, so that the one
training loop and `mammodp.inference.predict_proba` run it unchanged (`feature_table`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from mammodp.data.datasets import PatchTable
from mammodp.errors import ConfigError, DataError, PrivacyError

log = logging.getLogger(__name__)

REGIME = "radiomics-linear"
MODEL_KIND = "radiomics-linear"  # meta.json `kind` and the MLflow tag `model_kind`
FEATURE_CLASSES = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm", "shape2D")
FEATURE_PREFIX = "f:"  # feature columns of a feature table (`f:original_glcm_Contrast`)

# Public sets the standardisation may be fitted on: name -> (feature file, split). Each is
# outside the records epsilon covers (the CBIS training patients, and the validation split,
# which model selection reads without DP). `public`: the public phantom set (`mammodp phantom
# --public`: own seed, disjoint patients; the demo's choice). `cbis-test`: the official CBIS
# test split, label-free statistics (for plans without a public set; evaluation reads this split
# too, so its feature distribution informs the scaling). `bcdr`: the external set, likewise.
PUBLIC_SOURCES = {"cbis-test": ("cbis", "test"), "bcdr": ("bcdr", "external"), "public": ("public", None)}
PRIVATE_SPLITS = ("train", "val")


# --------------------------------------------------------------------------- features


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of a 1-D array (the level maximising the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))]) if len(between) > 1 else float(values.mean())


def lesion_mask(patch: np.ndarray) -> np.ndarray:
    """A lesion mask (uint8, 1 = lesion) segmented from a (H, W) patch in [0, 1].

    Otsu threshold of the patch smoothed with a Gaussian (sigma 1 px); the bright connected
    component that holds the centre (patches are centred on the lesion), else the largest one;
    holes filled. Falls back to a centred disc of a quarter of the side when nothing sensible
    is found (a flat patch). The border is kept at 0: pyradiomics needs a background label.
    """
    from scipy import ndimage

    h, w = patch.shape
    smooth = ndimage.gaussian_filter(patch.astype(np.float64), sigma=1.0)
    fg = smooth > _otsu(smooth.ravel()) if float(smooth.max() - smooth.min()) > 1e-6 else np.zeros_like(smooth, bool)
    labels, n = ndimage.label(fg)
    mask = np.zeros((h, w), dtype=bool)
    if n:
        centre = labels[h // 2, w // 2]
        if centre == 0:
            sizes = ndimage.sum(fg, labels, index=np.arange(1, n + 1))
            centre = int(np.argmax(sizes)) + 1
        mask = ndimage.binary_fill_holes(labels == centre)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = False
    if mask.sum() < 9:
        yy, xx = np.mgrid[:h, :w]
        mask = (yy - h / 2 + 0.5) ** 2 + (xx - w / 2 + 0.5) ** 2 <= (min(h, w) / 4) ** 2
    return mask.astype(np.uint8)


def _extractor(classes: Sequence[str], bin_count: int):
    try:
        import radiomics
        from radiomics import featureextractor
    except ImportError as exc:
        raise ConfigError(f"pyradiomics is not importable ({exc}); install: pip install --no-build-isolation "
                          "pyradiomics==3.0.1 (see pyproject.toml, extra `frd`)", field="baseline.features") from exc

    radiomics.setVerbosity(logging.ERROR)  # per-image warnings ("GLCM is symmetrical")
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    ex = featureextractor.RadiomicsFeatureExtractor(binCount=int(bin_count), force2D=True, force2Ddimension=0)
    ex.disableAllFeatures()
    for c in classes:
        ex.enableFeatureClassByName(c)
    return ex


def radiomics_features(images: np.ndarray, classes: Sequence[str] = FEATURE_CLASSES, bin_count: int = 32,
                       *, progress: bool = False, workers: int = 1) -> tuple[np.ndarray, list[str]]:
    """Radiomics features of each patch inside its `lesion_mask`.

    Args:
        images: (N, H, W) or (N, 1, H, W) floats in [0, 1].
        classes: pyradiomics feature classes (a subset of FEATURE_CLASSES).
        bin_count: grey levels of the texture matrices.
        progress: show a tqdm bar.
        workers: processes sharing the patches (`mammodp.runtime.map_chunks`); a patch's
            features depend on that patch alone, so the result is the same for any number.

    Returns:
        (float64 (N, F) features, their F names, e.g. `original_glcm_Contrast`).

    Raises:
        ValueError: unknown class, images that are not 2-D patches, or no patch.
    """
    import SimpleITK as sitk
    from tqdm.auto import tqdm

    unknown = [c for c in classes if c not in FEATURE_CLASSES]
    if unknown or not classes:
        raise ValueError(f"unknown feature classes {unknown}; known: {list(FEATURE_CLASSES)}")
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or len(x) == 0:
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W) with N >= 1, got shape {np.shape(images)}")
    if workers > 1 and len(x) > 1:
        import functools

        from mammodp.runtime import map_chunks

        parts = map_chunks(functools.partial(radiomics_features, classes=tuple(classes), bin_count=bin_count),
                           x, workers, desc="radiomics" if progress else None, unit="patch")
        return np.concatenate([f for f, _ in parts]), parts[0][1]
    ex = _extractor(classes, bin_count)
    rows, names = [], None
    for i in tqdm(range(len(x)), desc="radiomics", unit="patch", disable=not progress):
        img = sitk.GetImageFromArray(np.clip(x[i], 0.0, 1.0)[None])  # (1, H, W): one 2-D slice
        msk = sitk.GetImageFromArray(lesion_mask(x[i])[None])
        res = ex.execute(img, msk)
        feats = {k: float(v) for k, v in res.items() if not k.startswith("diagnostics")}
        if names is None:
            names = sorted(feats)
        rows.append([feats[n] for n in names])
    return np.asarray(rows, dtype=np.float64), list(names)


def feature_frame(frame: pd.DataFrame, features: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """A feature table: the manifest's identifying columns plus one `f:<name>` column per feature."""
    keep = [c for c in ("sample_id", "patient_id", "split", "label", "source") if c in frame.columns]
    ids = frame[keep].reset_index(drop=True).astype({c: str for c in keep if c != "label"})
    return pd.concat([ids, pd.DataFrame(features, columns=[FEATURE_PREFIX + n for n in names])], axis=1)


def feature_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith(FEATURE_PREFIX)]


def features_for(table: pd.DataFrame, frame: pd.DataFrame, path: Path | str = "features") -> np.ndarray:
    """Feature rows of `table` in the order of the manifest rows `frame` (matched by sample_id).

    Raises:
        DataError: a row of `frame` has no features (the feature file is stale).
    """
    by_id = table.set_index(table["sample_id"].astype(str))
    ids = frame["sample_id"].astype(str)
    missing = sorted(set(ids) - set(by_id.index))
    if missing:
        raise DataError(f"{len(missing)} patches have no features (e.g. {missing[0]}); rerun `mammodp features`",
                        path=path)
    return by_id.loc[ids, feature_columns(table)].to_numpy(np.float64)


def feature_table(features: np.ndarray, frame: pd.DataFrame) -> PatchTable:
    """Features as a PatchTable of (N, 1, 1, F) float32 "images": the training loop's input."""
    x = np.asarray(features, dtype=np.float32)
    if len(x) != len(frame):
        raise ValueError(f"{len(x)} feature rows for {len(frame)} manifest rows")
    return PatchTable(images=x[:, None, None, :], labels=frame["label"].to_numpy().astype(np.int64),
                      frame=frame.reset_index(drop=True))


# --------------------------------------------------------------------------- standardisation


@dataclass(frozen=True)
class Standardiser:
    """Per-feature mean and scale, fitted on public data (`source` says which)."""

    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,); constant features get 1
    source: str
    n: int  # public patches the statistics came from

    def describe(self) -> str:
        return (f"feature standardisation: mean/std of {self.n} PUBLIC patches ({self.source}); "
                "no private record enters it (no budget spent)")


def check_public(public: pd.DataFrame, private: pd.DataFrame, source: str,
                 private_splits: Sequence[str] = PRIVATE_SPLITS) -> None:
    """Refuse standardisation data that holds private records.

    Private: the CBIS training and validation splits (epsilon covers the former, model
    selection reads the latter without DP) and synthetic data (its generator saw them).

    Args:
        public: the candidate rows (feature-table or manifest columns).
        private: the private records' rows (sample_id, patient_id).
        source: its name, for the message.
        private_splits: split names that are private in `public`'s own table (the CBIS
            manifest's train/val; empty for a separate public set whose splits are its own).

    Raises:
        PrivacyError: a row of `public` is in a private split, synthetic, or shares a sample
            or a patient with `private`.
    """
    field = "baseline.scaler_source"
    if len(public) == 0:
        raise PrivacyError(f"the public set {source!r} has no patches", field=field)
    if "split" in public.columns and public["split"].astype(str).isin(list(private_splits)).any():
        raise PrivacyError(f"{source!r} holds private {'/'.join(PRIVATE_SPLITS)} patches: their statistics "
                           "would enter the model without DP", field=field)
    if "source" in public.columns and public["source"].astype(str).str.contains("synth").any():
        raise PrivacyError(f"{source!r} holds synthetic patches: their generator was trained on private "
                           "data, so their statistics are not public", field=field)
    for col in ("sample_id", "patient_id"):
        if col in public.columns and col in private.columns:
            shared = set(public[col].astype(str)) & set(private[col].astype(str))
            if shared:
                raise PrivacyError(f"{source!r} shares {len(shared)} {col}s with the private records "
                                   f"(e.g. {sorted(shared)[0]})", field=field)


def fit_standardiser(public_features: np.ndarray, source: str) -> Standardiser:
    """Mean / std of public features (std 0 or non-finite -> 1, so a constant feature stays 0)."""
    x = np.asarray(public_features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise DataError(f"standardisation needs >= 2 public patches, got shape {x.shape}",
                        field="baseline.scaler_source")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
    return Standardiser(mean=mean, std=std, source=source, n=len(x))


# --------------------------------------------------------------------------- the model


def _module():
    import torch
    from torch import nn

    class LinearBaseline(nn.Module):
        """(N, 1, 1, F) or (N, F) raw features -> standardised -> logits (N, 2)."""

        def __init__(self, n_features: int):
            super().__init__()
            self.register_buffer("mean", torch.zeros(n_features, dtype=torch.float32))
            self.register_buffer("std", torch.ones(n_features, dtype=torch.float32))
            self.linear = nn.Linear(n_features, 2)

        def forward(self, x):
            z = (x.reshape(x.shape[0], -1).float() - self.mean) / self.std
            return self.linear(z)

    return LinearBaseline


def create_linear(scaler: Standardiser):
    """A `LinearBaseline` whose standardisation is `scaler`'s; weights zero (logit 0)."""
    import torch

    model = _module()(len(scaler.mean))
    with torch.no_grad():
        model.mean.copy_(torch.as_tensor(scaler.mean, dtype=torch.float32))
        model.std.copy_(torch.as_tensor(scaler.std, dtype=torch.float32))
        model.linear.weight.zero_()
        model.linear.bias.zero_()
    return model


def fit_logistic(model, train: PatchTable, C: float, seed: int) -> None:
    """Non-private: scikit-learn's L2 logistic regression (lbfgs) on the standardised features,
    written into `model` in its logistic form (class-0 row zero)."""
    import torch
    from sklearn.linear_model import LogisticRegression

    x = train.images.reshape(len(train), -1).astype(np.float64)
    z = (x - model.mean.numpy()) / model.std.numpy()
    if np.unique(train.labels).size < 2:
        raise DataError("the training split has a single class: no logistic regression", field="split")
    lr = LogisticRegression(C=C, max_iter=5000, random_state=seed).fit(z, train.labels)
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.zero_()
        model.linear.weight[1] = torch.as_tensor(lr.coef_[0], dtype=torch.float32)
        model.linear.bias[1] = float(lr.intercept_[0])


def to_logistic(model) -> None:
    """Reduce a 2-logit linear model to its logistic form: w = w1 - w0, class-0 row zero
    (the same probabilities: softmax([a, b])[1] = sigmoid(b - a))."""
    import torch

    with torch.no_grad():
        w, b = model.linear.weight, model.linear.bias
        w[1] -= w[0].clone()
        b[1] -= b[0].clone()
        w[0].zero_()
        b[0].zero_()


# The folder layout of `mammodp.inference.save_classifier` (not imported: the feature stage,
# which imports this module, must not depend on the Swin's inference path).
MODEL_META, MODEL_WEIGHTS = "meta.json", "weights.pt"


def load_baseline(model_dir: str | Path):
    """Rebuild a baseline saved with `mammodp.inference.save_classifier` (meta `kind`).

    Returns:
        (model in eval mode on the CPU, meta dict).

    Raises:
        DataError: the folder is not a saved radiomics-linear model.
    """
    import json

    import torch

    d = Path(model_dir)
    if not (d / MODEL_META).is_file() or not (d / MODEL_WEIGHTS).is_file():
        raise DataError("not a saved model (needs meta.json and weights.pt)", path=d)
    meta = json.loads((d / MODEL_META).read_text())
    if meta.get("kind") != MODEL_KIND:
        raise DataError(f"not a {MODEL_KIND} model (kind {meta.get('kind')!r})", path=d)
    model = _module()(int(meta["n_features"]))
    model.load_state_dict(torch.load(d / MODEL_WEIGHTS, map_location="cpu", weights_only=True))
    model.eval()
    return model, meta


__all__ = ["REGIME", "MODEL_KIND", "FEATURE_CLASSES", "PUBLIC_SOURCES", "lesion_mask", "radiomics_features",
           "feature_frame", "features_for", "feature_table", "Standardiser", "check_public", "fit_standardiser",
           "create_linear", "fit_logistic", "to_logistic", "load_baseline"]
