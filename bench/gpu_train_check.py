"""A few epochs of the paper plan on a small CBIS-layout phantom, on the GPU: full-model DP and
head-only DP of Swin-T at 224 px, side by side with non-private training of the same model.

    python bench/gpu_train_check.py [--patients 200] [--epochs 3] [--epsilon 6] [--out DIR]

Uses the training core only (phantom writer, CBIS importer, `mammodp.training.fit`): no MLflow
or DVC, so it runs on a bare GPU machine with torch, timm, opacus and pydicom. Prints one line
per run: wall time of the first epoch (it holds the one-off check of the auto route against
vmap) and of each later epoch (steps, validation scoring and the accountant's epsilon), samples/s
of the later epochs, peak GPU memory, epsilon spent; and the DP/plain ratios of the later epochs.
Noise calibration is timed on its own line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mammodp.config import load_config  # noqa: E402
from mammodp.data.datasets import PatchTable  # noqa: E402
from mammodp.data.phantom import write_phantom  # noqa: E402
from mammodp.models.swin import create_classifier  # noqa: E402
from mammodp.privacy import calibrate_noise, steps_per_epoch  # noqa: E402
from mammodp.stages.prepare import import_source  # noqa: E402
from mammodp.stages.train import fit_spec  # noqa: E402
from mammodp.training import fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default=str(ROOT / "pipelines/paper.yaml"))
    ap.add_argument("--patients", type=int, default=200,
                    help="CBIS-layout training patients of the phantom (enough for more patches than the "
                         "plan's batch)")
    ap.add_argument("--epsilon", type=float, default=6.0)
    ap.add_argument("--epochs", type=int, default=3,
                    help="epochs per run: the first holds the one-off costs (the auto route's check against "
                         "vmap); the ratios are of the later epochs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default=None, help="override the plan's model.preset (e.g. swin_micro on CPU)")
    ap.add_argument("--out", default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be at least 2: the ratios are of the epochs after the first")

    cfg = load_config(args.plan)
    cfg = dataclasses.replace(
        cfg, phantom=dataclasses.replace(cfg.phantom, cbis_train_patients=args.patients,
                                         cbis_test_patients=max(4, args.patients // 4), bcdr_patients=4),
        prepare=dataclasses.replace(cfg.prepare, workers=min(8, os.cpu_count() or 1)),
        # --epochs epochs; noise is calibrated to the budget over them
        train=dataclasses.replace(cfg.train, epochs=args.epochs),
        # no local ImageNet file on a bare machine: random init (timing is the same)
        model=dataclasses.replace(cfg.model, pretrained_weights=None, preset=args.preset or cfg.model.preset),
    )
    work = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    t0 = time.perf_counter()
    write_phantom(work / "raw", cfg.phantom)
    import_source(cfg, "cbis-ddsm", work / "raw/cbis-ddsm", work / "prepared/cbis")
    print(f"phantom + prepare: {time.perf_counter() - t0:.1f} s")
    manifest = work / "prepared/cbis/manifest.parquet"
    train, val = PatchTable.load(manifest, ["train"]), PatchTable.load(manifest, ["val"])
    print(f"{len(train)} training / {len(val)} validation patches of {train.images.shape[-1]} px; "
          f"preset {cfg.model.preset}, batch {cfg.train.batch_size} (physical {cfg.train.physical_batch_size})")

    dev = torch.device(args.device)
    # Noise calibration is a one-off CPU cost of a private run: time it apart from the epoch.
    records = len(train) if cfg.dp.privacy_unit == "patch" else train.frame["patient_id"].nunique()
    q = cfg.train.batch_size / records
    if q > 1:
        print(f"--patients {args.patients} gives {records} training records, fewer than the plan's batch of "
              f"{cfg.train.batch_size}: raise --patients", file=sys.stderr)
        return 2
    t = time.perf_counter()
    sigma = calibrate_noise(args.epsilon, cfg.dp.delta, q, cfg.train.epochs * steps_per_epoch(q), cfg.dp.accountant)
    print(f"noise calibration ({cfg.dp.accountant}): sigma {sigma:.3f} in {time.perf_counter() - t:.1f} s")
    results = {}
    # Warm-up, not timed: CUDA context, cuDNN autotuning and lazy imports would otherwise be
    # charged to the first (plain) run and flatter the DP/plain ratios.
    t = time.perf_counter()
    one_epoch = dataclasses.replace(fit_spec(cfg, math.inf, 0, None), epochs=1)
    fit(create_classifier(cfg.model.preset, mode="full"), one_epoch, private=train, public=None, val=val,
        device=dev, progress=False)
    print(f"warm-up epoch (not timed in the ratios): {time.perf_counter() - t:.1f} s")
    for mode in ("full", "frozen_backbone"):
        for eps in (math.inf, args.epsilon):
            spec = fit_spec(cfg, eps, 0, {"noise_multiplier": sigma} if math.isfinite(eps) else None)
            torch.manual_seed(0)
            model = create_classifier(cfg.model.preset, mode=mode)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            marks = [time.perf_counter()]

            def on_epoch(_record, marks=marks):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                marks.append(time.perf_counter())

            res = fit(model, spec, private=train, public=None, val=val, device=dev, progress=False,
                      on_epoch=on_epoch)
            epochs = [b - a for a, b in zip(marks, marks[1:])]
            later = sum(epochs[1:]) / max(len(epochs) - 1, 1)
            peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")
            n = res.privacy["steps"] * res.privacy["expected_batch_size"] / len(epochs)  # samples per epoch
            results[(mode, eps)] = (later, peak)
            print(f"{mode:>16} eps={eps:<5g} first epoch {epochs[0]:6.2f} s, later {later:6.2f} s/epoch "
                  f"({n / later:7.1f} samples/s)  peak {peak:8.0f} MiB  epsilon {res.privacy['epsilon']:.3f}  "
                  f"sigma {res.privacy['noise_multiplier']:.3f}  steps {res.privacy['steps']}  "
                  f"route {res.privacy['per_sample_method']}")
            del res, model  # the next run's peak must not hold this run's weights and best state
    for mode in ("full", "frozen_backbone"):
        (tp, mp), (td, md) = results[(mode, math.inf)], results[(mode, args.epsilon)]
        print(f"{mode}: DP/plain time of the later epochs {td / tp:.2f}x (throughput {tp / td:.2f}x), "
              f"peak memory {md / mp:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
