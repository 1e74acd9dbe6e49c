"""`mammodp synth-quality`: Study A's synthesis-quality table, plus a memorisation check.

Rows (each per class - benign, malignant - and overall; each figure the mean, the sample std
and the mean's standard error over `synth_quality.subsets` random subsets of up to
`synth_quality.subset_size` images per side):

- `real-real`: two disjoint halves of the real CBIS training patches (the floor);
- `real-synth`: real training patches vs the synthetic set;
- `synth-synth`: two disjoint halves of the synthetic set (its internal spread);
- `internal-external`: CBIS training patches vs BCDR (a genuine domain shift, for scale).

Metrics: FRD through frd-score (`synth_quality.frd_version`, v0 = the paper's), and FID with
ImageNet Inception from the local file `synth_quality.inception_weights` (skipped with one
line when unset or missing). Features are extracted once per image and reused by every
subset. Memorisation: nearest-training-image distances of the synthetic images against the
held-out real baseline (the val split), with a grid of the closest pairs. The grid shows the
real training patches only with `synth_quality.show_real_pairs: true` (a release of private
data without DP, declared in the run); otherwise their panels are withheld.

Writes OUT (`metrics/synthesis.json`, a DVC metric) and PLOTS/{closest_pairs,nn_distances}.png,
and logs the same to one MLflow run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mammodp.config import Config, flatten
from mammodp.data.manifest import manifest_path
from mammodp.errors import DataError

log = logging.getLogger(__name__)

PAIRS = {  # name: (source A, source B); same source = two disjoint halves
    "real-real": ("real", "real"),
    "real-synth": ("real", "synth"),
    "synth-synth": ("synth", "synth"),
    "internal-external": ("real", "external"),
}
CLASSES = {"overall": None, "benign": 0, "malignant": 1}

RELEASE_NOTE = (
    "Released without DP: this stage compares the synthetic set with the REAL CBIS training patches "
    "(and the held-out split and BCDR): FID/FRD figures, nearest-neighbour distances and the "
    "memorisation flags are statistics of private data that no epsilon covers; with "
    "synth_quality.show_real_pairs the closest-pairs grid shows real training patches themselves."
)
WITHHELD_NOTE = "synth_quality.show_real_pairs is false: the closest-pairs grid withholds the real patches."


def draw_subsets(labels_a: np.ndarray, labels_b: np.ndarray | None, cls: int | None, k: int, size: int,
                 rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]] | str:
    """K pairs of index subsets for one comparison, or the reason none can be drawn.

    Args:
        labels_a: labels of source A.
        labels_b: labels of source B, or None to split source A into two disjoint halves.
        cls: class to restrict to, or None for all.
        k: number of subsets.
        size: most images per side.
        rng: numpy random generator.

    Returns:
        A list of k (indices into A, indices into B), each side of equal length >= 2; or a
        one-line reason when a side would have fewer than 2 images.
    """
    pool_a = np.flatnonzero(labels_a == cls) if cls is not None else np.arange(len(labels_a))
    if labels_b is None:
        m = min(size, len(pool_a) // 2)
        if m < 2:
            return f"fewer than 4 images to halve ({len(pool_a)})"
        out = []
        for _ in range(k):
            perm = rng.permutation(pool_a)
            out.append((np.sort(perm[:m]), np.sort(perm[m : 2 * m])))
        return out
    pool_b = np.flatnonzero(labels_b == cls) if cls is not None else np.arange(len(labels_b))
    m = min(size, len(pool_a), len(pool_b))
    if m < 2:
        return f"fewer than 2 images on a side ({len(pool_a)} vs {len(pool_b)})"
    return [(np.sort(rng.choice(pool_a, m, replace=False)), np.sort(rng.choice(pool_b, m, replace=False)))
            for _ in range(k)]


def summarise(values: list[float], n_per_side: int) -> dict[str, Any]:
    """Mean, sample std (ddof=1; 0 for one subset) and the mean's standard error (std / sqrt(K))
    of one cell of the table. The std is the spread of ONE subset's figure; the SE is how far
    the mean over K subsets may sit from the mean over all subsets of that size, which is what
    decides whether two rows are in a given order (see `frd_order`)."""
    v = np.asarray(values, dtype=np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "se": std / float(np.sqrt(len(v))),
            "n_per_side": int(n_per_side), "subsets": int(len(v))}


def frd_order(table: dict[str, Any], cls: str = "overall", z: float = 2.0) -> str | None:
    """Study A's order for one class of an FRD / FID table: `below` when real-synth is below
    internal-external by more than z combined standard errors, `above` when it is above by
    more, `level` otherwise (the subsets cannot tell them apart); None when a row is missing."""
    try:
        rs, ie = table["real-synth"][cls], table["internal-external"][cls]
        diff = rs["mean"] - ie["mean"]
        se = float(np.hypot(rs.get("se", 0.0), ie.get("se", 0.0)))
    except (KeyError, TypeError):
        return None
    if diff < -z * se:
        return "below"
    return "above" if diff > z * se else "level"


def score_table(plan: dict[str, dict[str, Any]], features: dict[str, np.ndarray],
                distance: Callable[[np.ndarray, np.ndarray], float]) -> dict[str, dict[str, Any]]:
    """Apply `distance` to every subset pair of `plan` ({pair: {class: subsets or reason}})."""
    table: dict[str, dict[str, Any]] = {}
    for pair, cells in plan.items():
        src_a, src_b = PAIRS[pair]
        table[pair] = {}
        for cls_name, subsets in cells.items():
            if isinstance(subsets, str):
                table[pair][cls_name] = {"skipped": subsets}
                continue
            vals = [distance(features[src_a][ia], features[src_b][ib]) for ia, ib in subsets]
            table[pair][cls_name] = summarise(vals, len(subsets[0][0]))
    return table


def _needed(plan: dict[str, dict[str, Any]], n: dict[str, int]) -> dict[str, np.ndarray]:
    """Per source, a boolean mask of the images some subset uses (features for those only)."""
    need = {s: np.zeros(c, dtype=bool) for s, c in n.items()}
    for pair, cells in plan.items():
        src_a, src_b = PAIRS[pair]
        for subsets in cells.values():
            if isinstance(subsets, str):
                continue
            for ia, ib in subsets:
                need[src_a][ia] = True
                need[src_b][ib] = True
    return need


def _features_for(images: np.ndarray, mask: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Run `fn` on the masked images; rows of unused images stay NaN (never read)."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return np.zeros((len(images), 0))
    feats = fn(images[idx])
    out = np.full((len(images), feats.shape[1]), np.nan)
    out[idx] = feats
    return out


def _load(manifest: Path, splits: list[str] | None, shape: tuple[int, int] | None):
    """A PatchTable's images (N, 1, H, W), resized to `shape` when it differs, and labels."""
    import torch
    from torch.nn import functional as F

    from mammodp.data.datasets import PatchTable

    table = PatchTable.load(manifest, splits=splits)
    images = table.images
    if shape is not None and images.shape[-2:] != tuple(shape):
        log.info("resizing %s patches from %s to %s", manifest, images.shape[-2:], shape)
        images = F.interpolate(torch.from_numpy(images), size=shape, mode="bilinear", antialias=True,
                               align_corners=False).numpy()
    return images, table.labels, table.frame


def _metrics_for_mlflow(prefix: str, node: Any, out: dict[str, float]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _metrics_for_mlflow(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        out[prefix] = float(node)


def synthesis_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers for `dvc metrics show`: overall mean per metric and pair, their
    standard errors (`frd_se`, `fid_se`), and the memorisation figures. Skipped metrics are
    absent (the report says why)."""
    out: dict[str, Any] = {}
    for metric in ("frd", "fid"):
        block = results.get(metric, {})
        if block.get("skipped"):
            continue
        cells = {pair: block[pair]["overall"] for pair in PAIRS
                 if isinstance(block.get(pair), dict) and "mean" in block[pair].get("overall", {})}
        if cells:
            out[metric] = {pair: round(float(c["mean"]), 4) for pair, c in cells.items()}
            out[f"{metric}_se"] = {pair: round(float(c["se"]), 4) for pair, c in cells.items() if "se" in c}
    mem = results["memorisation"]
    out["memorisation"] = {k: mem[k] for k in ("fraction_below_threshold", "n_flagged", "threshold")
                           if isinstance(mem.get(k), (int, float))}
    return out


def run(cfg: Config, out: Path = Path("metrics/synthesis.json"), plots: Path = Path("plots/synthesis"),
        report: Path = Path("reports/synthesis.json")) -> dict:
    """Compute the table and the memorisation check; write OUT (numbers), REPORT (the whole
    table with its notes) and PLOTS; return the results.

    Raises:
        DataError: a manifest or patch is missing, or a split the check needs is empty.
        WeightsError: `inception_weights` names a file that is not a usable Inception.
    """
    from mammodp import tracking
    from mammodp.io import atomic_dir, write_json
    from mammodp.metrics import fid as fidm
    from mammodp.metrics import frd as frdm
    from mammodp.metrics import memorisation as memo
    from mammodp.runtime import resolve_device, seed_everything

    q = cfg.synth_quality
    seed_everything(q.seed)
    prepared = Path(cfg.data.prepared_dir)
    cbis_manifest = manifest_path(prepared, "cbis")
    synth_manifest = manifest_path(cfg.data.synthetic_dir)
    bcdr_manifest = manifest_path(prepared, "bcdr")

    real, real_labels, _ = _load(cbis_manifest, ["train"], None)
    shape = tuple(real.shape[-2:])
    synth, synth_labels, synth_frame = _load(synth_manifest, None, shape)
    from mammodp.data.datasets import read_manifest_table

    splits = set(read_manifest_table(cbis_manifest)["split"].astype(str))
    held_split = "val" if "val" in splits else "test" if "test" in splits else None
    if held_split is None:
        raise DataError("no held-out split (val or test) for the memorisation baseline", path=cbis_manifest)
    heldout, _, _ = _load(cbis_manifest, [held_split], shape)
    images = {"real": real, "synth": synth}
    labels = {"real": real_labels, "synth": synth_labels}
    external_reason = None
    if bcdr_manifest.is_file():
        images["external"], labels["external"], _ = _load(bcdr_manifest, None, shape)
    else:
        external_reason = f"external set {bcdr_manifest} not found"
        log.warning("internal-external row skipped: %s", external_reason)

    rng = np.random.default_rng(q.seed)
    plan: dict[str, dict[str, Any]] = {}
    for pair, (src_a, src_b) in PAIRS.items():
        plan[pair] = {}
        for cls_name, cls in CLASSES.items():
            if src_b not in labels:
                plan[pair][cls_name] = external_reason
                continue
            plan[pair][cls_name] = draw_subsets(labels[src_a], None if src_a == src_b else labels[src_b],
                                                cls, q.subsets, q.subset_size, rng)
    need = _needed(plan, {s: len(v) for s, v in labels.items()})

    gen = {
        "run_id": str(synth_frame["generator_run_id"].iloc[0]) if "generator_run_id" in synth_frame else None,
        "epsilon": str(synth_frame["generator_epsilon"].iloc[0]) if "generator_epsilon" in synth_frame else None,
        "trained_on": (str(synth_frame["generator_trained_on"].iloc[0])
                       if "generator_trained_on" in synth_frame else None),
    }
    results: dict[str, Any] = {
        "subsets": q.subsets, "subset_size": q.subset_size, "seed": q.seed, "generator": gen,
        "n_images": {"real_train": len(real), "synthetic": len(synth), "heldout": len(heldout),
                     "external": len(images["external"]) if "external" in images else 0},
    }

    # FRD
    ok, frd_info = frdm.frd_status()
    frd_result: dict[str, Any] = {"version": q.frd_version, "package": frd_info if ok else None}
    if ok:
        feats = {s: _features_for(images[s][:, 0], need[s],
                                  lambda x: frdm.radiomics_features(x, q.frd_version, progress=True,
                                                                     workers=q.workers))
                 for s in images}
        frd_result.update(score_table(plan, feats, lambda a, b: frdm.frd_from_features(a, b, q.frd_version)))
        frd_result["skipped"] = None
    else:
        log.warning("%s", frd_info)
        frd_result["skipped"] = frd_info
    results["frd"] = frd_result

    # FID
    reason = fidm.fid_skip_reason(q.inception_weights)
    if reason is not None:
        log.warning("%s", reason)
        results["fid"] = {"skipped": reason}
    else:
        net = fidm.load_inception(q.inception_weights)
        device = resolve_device("auto")  # features only: CUDA when present
        feats = {s: _features_for(images[s], need[s],
                                  lambda x: fidm.extract_features(net, x, device=device, progress=True))
                 for s in images}
        results["fid"] = {"skipped": None, "weights": str(q.inception_weights), "format": net.kind,
                          "num_features": net.num_features, **score_table(plan, feats, fidm.frechet_distance)}

    # Memorisation
    check = memo.memorisation_check(synth, real, heldout, percentile=q.memorisation_percentile,
                                    size=q.memorisation_size)
    mem = check.summary()
    mem["baseline_split"] = held_split
    mem["size"] = q.memorisation_size
    mem["by_class"] = {name: float(check.flagged[synth_labels == c].mean()) if (synth_labels == c).any() else None
                       for name, c in CLASSES.items() if c is not None}
    results["memorisation"] = mem
    if mem["n_flagged"]:
        log.warning("memorisation: %d of %d synthetic images are closer to a training image than the "
                    "p%g of held-out real images (%.4f)", mem["n_flagged"], mem["n_synthetic"],
                    q.memorisation_percentile, check.threshold)

    # Real training patches in a shared artefact are a release without DP: only when asked for.
    figures = {"closest_pairs.png": memo.closest_pairs_figure(synth, real, check, k=q.closest_pairs,
                                                              show_train=q.show_real_pairs),
               "nn_distances.png": memo.distance_histogram_figure(check)}
    with atomic_dir(plots) as tmp:
        for name, fig in figures.items():
            fig.savefig(tmp / name, dpi=90)
    write_json(report, results)
    write_json(out, synthesis_metrics(results))

    metrics: dict[str, float] = {}
    for key in ("frd", "fid"):
        _metrics_for_mlflow(key, {k: v for k, v in results[key].items() if isinstance(v, dict)}, metrics)
    _metrics_for_mlflow("memorisation", {k: v for k, v in mem.items() if k != "percentile"}, metrics)
    tags = {"generator_run_id": gen["run_id"], "generator_epsilon": gen["epsilon"],
            "real_patches_shown": str(q.show_real_pairs).lower(),
            "frd_version": q.frd_version, "frd": frd_info if ok else "skipped",
            "fid": "skipped" if results["fid"]["skipped"] else results["fid"]["format"]}
    with tracking.start_run(cfg.experiment, "synth_quality", name="synth_quality", tags=tags,
                            params={f"synth_quality.{k}": v for k, v in flatten(q).items()},
                            description=RELEASE_NOTE):
        tracking.log_metrics(metrics)
        import mlflow

        mlflow.log_text(RELEASE_NOTE + ("" if q.show_real_pairs else " " + WITHHELD_NOTE),
                        "privacy/what_epsilon_covers.txt")
        for name, fig in figures.items():
            tracking.log_figure(fig, f"synthesis/{name}", saved=plots / name)
    _log_table(results)
    return results


def _log_table(results: dict[str, Any]) -> None:
    """The table as log lines: metric, pair, overall mean +- std."""
    for metric in ("frd", "fid"):
        block = results[metric]
        if block.get("skipped"):
            continue
        for pair in PAIRS:
            cell = block.get(pair, {}).get("overall", {})
            if "mean" in cell:
                log.info("%s %-18s overall %.4g (SE %.2g; one subset's std %.3g; %d subsets of %d per side)",
                         metric.upper(), pair, cell["mean"], cell["se"], cell["std"], cell["subsets"],
                         cell["n_per_side"])
        for cls in CLASSES:
            order = frd_order(block, cls)
            if order is not None:
                log.info("%s real-synth vs internal-external, %s: %s", metric.upper(), cls, order)
    m = results["memorisation"]
    log.info("memorisation: %.3f of synthetic images below the held-out p%g distance %.4f",
             m["fraction_below_threshold"], m["percentile"], m["threshold"])
