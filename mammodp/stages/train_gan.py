"""`mammodp train-gan`: train the MCGAN on the real CBIS training patches.

Reads `data/prepared/cbis/manifest.parquet` (split `train` only: validation and test never
touch the GAN), resizes the patches to `gan.image_size` and trains the conditional DCGAN of
`mammodp.models.mcgan`. With `gan.dp.enabled` the discriminator is trained with DP-SGD
(Opacus, Poisson sampling, the accountant of `gan.dp.accountant`) and the generator is
post-processing; `models/mcgan/gan.json` carries the final epsilon (or `non-private`).

Outputs in OUT (default `models/mcgan`):
- `generator.pt`: the final generator (weights + spec + provenance), read by `synthesize`;
- `gan.json`: run id, epsilon, delta, accountant, noise multiplier, steps, trained_on, sizes;
- `checkpoint.pt`: full training state every `gan.checkpoint_every` epochs (`--resume`
  continues the optimisers, the accountant, every random stream and the MLflow run);
- `history.csv`: per-epoch mean losses and epsilon (for `dvc plots`);
- `samples/epoch-NNNN-<class>.png`: a grid of samples per class every `gan.sample_every` epochs.

Each file is written atomically; a fresh (non-resume) run first removes these files so a
folder never mixes two runs.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import pickle
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammodp.config import Config, flatten, format_epsilon
from mammodp.errors import ConfigError, DataError, PrivacyError

log = logging.getLogger(__name__)

CLASS_NAMES = {0: "benign", 1: "malignant"}
GRID_PER_CLASS = 16  # samples per class in each grid (4 x 4)
OUTPUT_FILES = ("generator.pt", "gan.json", "checkpoint.pt", "history.csv")
# Opacus warns on every hooked backward whose inputs need no grad (our images) and when
# secure RNG is off (we pick the noise generator explicitly): neither is actionable here.
_QUIET = ("Full backward hook is firing", "Secure RNG turned off", "Using a non-full backward hook")


def manifest_path(cfg: Config) -> Path:
    """The real training manifest the GAN learns from."""
    return Path(cfg.data.prepared_dir) / "cbis" / "manifest.parquet"


def trained_on(cfg: Config, n_images: int) -> dict[str, Any]:
    """Lineage of the training data: manifest, its hash, the raw-data version, the split."""
    from mammodp import tracking

    path = manifest_path(cfg)
    info = {
        "manifest": str(path),
        "manifest_hash": tracking.manifest_hash(path),
        "data_version": tracking.data_version(),
        "split": "train",
        "n_images": int(n_images),
    }
    info["text"] = (f"{info['manifest']}[split=train] sha256:{info['manifest_hash']} "
                    f"data:{info['data_version']} n={n_images}")
    return info


def load_training_images(cfg: Config):
    """Real training patches as (images (N,1,S,S) in [-1, 1], labels (N,)) CPU tensors."""
    import torch
    from torch.nn import functional as F

    from mammodp.data.datasets import PatchTable

    table = PatchTable.load(manifest_path(cfg), splits=["train"])
    images, labels = table.tensors()
    labels = labels.clone()
    if set(np.unique(labels.numpy())) - {0, 1}:
        raise DataError("labels must be 0 (benign) or 1 (malignant)", path=manifest_path(cfg))
    s = cfg.gan.image_size
    if images.shape[-1] != s or images.shape[-2] != s:
        images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    return (images * 2.0 - 1.0).contiguous(), labels


def tile(images: np.ndarray, cols: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, 1, S, S) images in [0, 1] -> one (rows*(S+pad)+pad, cols*(S+pad)+pad) mosaic, white gaps."""
    n, s = len(images), images.shape[-1]
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.ones((rows * (s + pad) + pad, cols * (s + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        out[pad + r * (s + pad): pad + r * (s + pad) + s, pad + c * (s + pad): pad + c * (s + pad) + s] = images[i, 0]
    return out


def _grid_figure(images: np.ndarray, title: str):
    """A square grid of (N, 1, S, S) images in [0, 1] as a matplotlib Figure (no pyplot).

    One axes showing a mosaic: drawing one image is far cheaper than N axes.
    """
    from matplotlib.figure import Figure

    mosaic = tile(images)
    fig = Figure(figsize=(4.0, 4.0 * mosaic.shape[0] / mosaic.shape[1] + 0.3), layout="constrained")
    ax = fig.subplots()
    ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    return fig


def _clear_outputs(out: Path) -> None:
    """Remove this stage's own files from OUT (never anything else the user put there)."""
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    if (out / "samples").is_dir():
        shutil.rmtree(out / "samples")


def _save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    import torch

    from mammodp.io import atomic_path

    with atomic_path(out / "checkpoint.pt") as tmp:
        torch.save(state, tmp)


def _load_checkpoint(out: Path) -> dict[str, Any]:
    import torch

    path = out / "checkpoint.pt"
    if not path.is_file():
        raise DataError("no checkpoint to resume from (run without --resume to start afresh)", path=path)
    try:
        # Our own file: it holds optimizer states, RNG states and the accountant history.
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"unreadable checkpoint: {exc}", path=path) from exc


def _check_resumable(ckpt: dict[str, Any], cfg: Config, spec) -> None:
    """A checkpoint continues only the run it came from: same nets, data rate and privacy."""
    saved = ckpt["config"]
    now = flatten(cfg.gan)
    keys = ("image_size", "latent_dim", "width", "batch_size", "dp.enabled", "dp.epsilon", "dp.delta",
            "dp.max_grad_norm")
    for key in keys:
        if saved.get(key) != now.get(key):
            raise ConfigError(
                f"checkpoint was trained with {saved.get(key)!r}, params say {now.get(key)!r}; "
                "run without --resume to start afresh", field=f"gan.{key}")
    if dataclasses.asdict(spec) != ckpt["spec"]:
        raise ConfigError("checkpoint networks differ from params; run without --resume", field="gan")


def _noise_multiplier(dp, sample_rate: float, epochs: int) -> tuple[float, str]:
    """Noise multiplier reaching `dp.epsilon` after `epochs`; PRV falls back to RDP on failure."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        sigma = get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=dp.delta,
                                     sample_rate=sample_rate, epochs=epochs, accountant=dp.accountant)
        return float(sigma), dp.accountant
    except (ValueError, RuntimeError, OverflowError) as exc:
        if dp.accountant != "prv":
            raise PrivacyError(f"no noise multiplier reaches epsilon={dp.epsilon}: {exc}",
                               field="gan.dp.epsilon") from exc
        log.warning("PRV accountant failed (%s); using RDP", exc)
    try:
        sigma = get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=dp.delta,
                                     sample_rate=sample_rate, epochs=epochs, accountant="rdp")
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise PrivacyError(f"no noise multiplier reaches epsilon={dp.epsilon}: {exc}",
                           field="gan.dp.epsilon") from exc
    return float(sigma), "rdp"


def run(cfg: Config, out: Path = Path("models/mcgan"), resume: bool = False, device: str | None = None) -> dict:
    """Train the MCGAN and write OUT; returns the content of `gan.json`.

    Args:
        cfg: the whole config (reads `gan`, `data.prepared_dir`, `seed`, `experiment`).
        out: output folder.
        resume: continue from OUT/checkpoint.pt (same params required).
        device: overrides `gan.device` (`cpu`, `cuda`, `cuda:N`, `auto`).

    Raises:
        DataError: the manifest or a patch is missing, or there is no checkpoint to resume.
        ConfigError: params that the checkpoint or the architecture cannot take.
        PrivacyError: the target epsilon cannot be reached.
    """
    import torch

    from mammodp.runtime import resolve_device

    dev = resolve_device(device or cfg.gan.device)
    threads = torch.get_num_threads()
    # Small nets on a shared CPU: extra intra-op threads mostly wait on each other.
    if dev.type == "cpu" and cfg.gan.cpu_threads > 0:
        torch.set_num_threads(cfg.gan.cpu_threads)
    try:
        return _train(cfg, Path(out), resume, dev)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: Config, out: Path, resume: bool, dev) -> dict:
    """The training run behind `run`, on a resolved device."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm import tqdm

    from mammodp import tracking
    from mammodp.data.datasets import random_flips
    from mammodp.io import write_json
    from mammodp.models import mcgan
    from mammodp.runtime import seed_everything

    g = cfg.gan
    seed_everything(cfg.seed)
    images, labels = load_training_images(cfg)
    n = len(labels)
    lineage = trained_on(cfg, n)
    G, D, spec = mcgan.create_gan(image_size=g.image_size, latent_dim=g.latent_dim, width=g.width,
                                  dp=g.dp.enabled)
    G, D = G.to(dev), D.to(dev)
    opt_g = torch.optim.Adam(G.parameters(), lr=g.lr, betas=g.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=g.lr, betas=g.betas)

    ckpt = None
    if resume:
        ckpt = _load_checkpoint(out)
        _check_resumable(ckpt, cfg, spec)
    else:
        _clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)

    loader_gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(TensorDataset(images, labels), batch_size=g.batch_size, shuffle=True,
                        generator=loader_gen, drop_last=False)
    engine = None
    privacy: dict[str, Any] = {"epsilon": "non-private"}
    if g.dp.enabled:
        from opacus import PrivacyEngine

        sample_rate = 1.0 / len(loader)
        if ckpt is not None:
            sigma, accountant = ckpt["privacy"]["noise_multiplier"], ckpt["privacy"]["accountant"]
        else:
            sigma, accountant = _noise_multiplier(g.dp, sample_rate, g.epochs)
        noise_gen = torch.Generator(device=dev)
        if g.dp.reproducible_noise:
            noise_gen.manual_seed(cfg.seed)
        else:
            noise_gen.seed()  # from the OS: the DP guarantee needs unpredictable noise
        engine = PrivacyEngine(accountant=accountant)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="|".join(_QUIET))
            D, opt_d, loader = engine.make_private(
                module=D, optimizer=opt_d, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=g.dp.max_grad_norm, poisson_sampling=True, noise_generator=noise_gen)
        privacy = {"epsilon": 0.0, "delta": g.dp.delta, "accountant": accountant, "noise_multiplier": sigma,
                   "sample_rate": sample_rate, "max_grad_norm": g.dp.max_grad_norm, "steps": 0,
                   "target_epsilon": g.dp.epsilon, "privacy_unit": "patch",
                   "reproducible_noise": g.dp.reproducible_noise}
    d_core = D._module if hasattr(D, "_module") else D  # the plain discriminator inside Opacus' wrapper
    amp = bool(g.amp and dev.type == "cuda" and not g.dp.enabled)  # Opacus' per-sample grads stay fp32
    scaler = torch.amp.GradScaler("cuda") if amp else None
    rng = torch.Generator().manual_seed(cfg.seed + 1)  # z, fake labels, targets, flips
    fixed_z = torch.randn(GRID_PER_CLASS, g.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 2))

    # Real diversity per class, the yardstick of mode collapse.
    pick = torch.Generator().manual_seed(cfg.seed + 3)
    real_div = {}
    for c in (0, 1):
        idx = torch.nonzero(labels == c).view(-1)
        idx = idx[torch.randperm(len(idx), generator=pick)[:64]]
        real_div[c] = mcgan.pairwise_diversity((images[idx] + 1) / 2)

    start_epoch, step, history, run_id, warns = 0, 0, [], None, []
    if ckpt is not None:
        G.load_state_dict(ckpt["G"])
        d_core.load_state_dict(ckpt["D"])
        opt_g.load_state_dict(ckpt["opt_g"])
        (opt_d.original_optimizer if engine else opt_d).load_state_dict(ckpt["opt_d"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if engine is not None:
            engine.accountant.load_state_dict(ckpt["accountant"])
            opt_d.generator.set_state(ckpt["noise_gen"])
            privacy.update(ckpt["privacy"])
        rng.set_state(ckpt["rng"])
        loader_gen.set_state(ckpt["loader_gen"])
        torch.set_rng_state(ckpt["torch_rng"])  # Poisson sampler draws from the global stream
        if torch.cuda.is_available() and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        run_id, warns = ckpt["run_id"], list(ckpt.get("warnings", []))
        log.info("resuming from epoch %d (step %d) of %s", start_epoch, step, out / "checkpoint.pt")

    target_eps = g.dp.epsilon if g.dp.enabled else math.inf
    tags = {"epsilon": format_epsilon(target_eps), "seed": cfg.seed, "device": dev.type,
            "trained_on": lineage["text"]}
    if g.dp.enabled:
        tags["private_data_without_dp"] = "false"
        tags.update({"delta": g.dp.delta, "accountant": privacy["accountant"], "privacy_unit": "patch"})
    else:
        # Same flag as every other run that touched private data without DP.
        tags["private_data_without_dp"] = "true"
        tags["private_data_note"] = "GAN trained on real patches without DP"
    params = {f"gan.{k}": v for k, v in flatten(g).items()} | {"seed": cfg.seed, "n_train": n}

    def snapshot(epoch: int) -> dict[str, Any]:
        state = {
            "epoch": epoch, "step": step, "history": history, "run_id": run_id, "warnings": warns,
            "config": flatten(g), "spec": dataclasses.asdict(spec),
            "G": G.state_dict(), "D": d_core.state_dict(), "opt_g": opt_g.state_dict(),
            "opt_d": (opt_d.original_optimizer if engine else opt_d).state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng.get_state(), "loader_gen": loader_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "privacy": dict(privacy),
        }
        if engine is not None:
            state["accountant"] = engine.accountant.state_dict()
            state["noise_gen"] = opt_d.generator.get_state()
        return state

    def warn(kind: str, message: str, epoch: int) -> None:
        # A metric now (visible while the run is live), a tag when the run is closed.
        log.warning("%s: %s", kind, message)
        warns.append(f"{kind}: {message}")
        tracking.log_metrics({f"warning_{kind}": 1.0}, step=epoch)

    t0 = time.perf_counter()
    with warnings.catch_warnings(), tracking.start_run(
        cfg.experiment, "train_gan", name=tracking.run_name("train_gan", epsilon=target_eps, seed=cfg.seed),
        tags=tags, params=None if run_id else params, run_id=run_id,
        description="MCGAN (malignancy-conditioned DCGAN) on real CBIS training patches",
    ) as mlrun:
        warnings.filterwarnings("ignore", message="|".join(_QUIET))
        run_id = mlrun.info.run_id
        G.train()
        D.train()
        bar = tqdm(range(start_epoch, g.epochs), initial=start_epoch, total=g.epochs, desc="train-gan",
                   unit="epoch")
        stopped = False
        for epoch in bar:
            good_g = copy.deepcopy(G.state_dict())  # restored if this epoch diverges
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            for x, y in loader:
                x = random_flips(x, generator=rng).to(dev, non_blocking=True)
                y = y.to(dev)
                d_stats = mcgan.discriminator_step(
                    D, G, opt_d, x, y, label_range=g.real_label_range,
                    scaler=scaler, autocast=amp, generator=rng)
                g_stats = mcgan.generator_step(G, D, opt_g, batch=g.batch_size, device=dev, scaler=scaler,
                                               autocast=amp, generator=rng)
                if scaler is not None:
                    scaler.update()
                step += 1
                stats = d_stats | g_stats
                tracking.log_metrics(stats, step=step)
                for k, v in stats.items():
                    if math.isfinite(v):
                        sums[k] = sums.get(k, 0.0) + v
                        counts[k] = counts.get(k, 0) + 1
                # An empty Poisson batch has no discriminator loss (NaN by design), not a divergence.
                watched = ("loss_d", "loss_g") if x.shape[0] else ("loss_g",)
                bad = [k for k in watched if not math.isfinite(stats[k])]
                if bad:
                    G.load_state_dict(good_g)
                    warn("diverging_loss", f"{bad[0]} became {stats[bad[0]]} at epoch {epoch + 1}, step "
                                           f"{step}; training stopped, generator of epoch {epoch} kept",
                         epoch + 1)
                    stopped = True
                    break
            if stopped:
                break
            means = {k: sums[k] / counts[k] for k in sums}
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step,
                                   **{k: means.get(k, float("nan")) for k in ("loss_d", "loss_g", "d_real", "d_fake")}}
            epoch_metrics = {f"epoch_{k}": v for k, v in means.items()}
            if engine is not None:
                privacy["steps"] = int(sum(h[2] for h in engine.accountant.history))
                privacy["epsilon"] = float(engine.get_epsilon(g.dp.delta))
                row["epsilon"] = privacy["epsilon"]
                epoch_metrics.update({"epsilon": privacy["epsilon"], "delta": g.dp.delta,
                                      "noise_multiplier": privacy["noise_multiplier"], "dp_steps": privacy["steps"],
                                      "sample_rate": privacy["sample_rate"]})
            reason = mcgan.diverged({k: means[k] for k in ("loss_d", "loss_g") if k in means}, g.diverge_loss)
            if reason:
                warn("diverging_loss", f"epoch {epoch + 1}: {reason}", epoch + 1)
            last = epoch + 1 == g.epochs
            if (epoch + 1) % g.sample_every == 0 or last:
                ratios = []
                for c, cname in sorted(CLASS_NAMES.items()):
                    grid = mcgan.sample(G, np.full(GRID_PER_CLASS, c), z=fixed_z)
                    fig = _grid_figure(grid, f"{cname}, epoch {epoch + 1}")
                    name = f"samples/epoch-{epoch + 1:04d}-{cname}.png"
                    fig.savefig(out / name, dpi=80)
                    tracking.log_figure(fig, name)
                    div = mcgan.pairwise_diversity(grid)
                    ratios.append(div / real_div[c] if real_div[c] > 0 else float("nan"))
                    if mcgan.mode_collapse(div, real_div[c], g.collapse_threshold):
                        warn("mode_collapse", f"epoch {epoch + 1}: {cname} samples' diversity {div:.4f} is below "
                                              f"{g.collapse_threshold:g} x real ({real_div[c]:.4f})", epoch + 1)
                epoch_metrics["diversity_ratio"] = float(np.nanmin(ratios))
                row["diversity_ratio"] = epoch_metrics["diversity_ratio"]
            history.append(row)
            tracking.log_metrics(epoch_metrics, step=epoch + 1)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss_d", "loss_g") if math.isfinite(row[k])}
                            | ({"eps": f"{privacy['epsilon']:.2f}"} if engine else {}))
            if (epoch + 1) % g.checkpoint_every == 0 or last:
                _save_checkpoint(out, snapshot(epoch + 1))
        bar.close()
        if engine is not None:  # also counts the steps of an epoch cut short by divergence
            privacy["steps"] = int(sum(h[2] for h in engine.accountant.history))
            if privacy["steps"]:
                privacy["epsilon"] = float(engine.get_epsilon(g.dp.delta))
        elapsed = time.perf_counter() - t0
        epochs_done = history[-1]["epoch"] if history else 0
        info = {
            "run_id": run_id,
            "epsilon": privacy["epsilon"] if engine is not None else "non-private",
            "delta": g.dp.delta if engine is not None else None,
            "privacy": privacy,
            "trained_on": lineage,
            "image_size": spec.image_size, "latent_dim": spec.latent_dim, "width": spec.width,
            "dp": spec.dp, "epochs": epochs_done, "steps": step, "seed": cfg.seed,
            "device": dev.type, "train_seconds": round(elapsed, 2), "warnings": warns,
        }
        mcgan.save_generator(out / "generator.pt", G, meta=info)
        write_json(out / "gan.json", info)
        pd.DataFrame(history).to_csv(out / "history.csv", index=False)
        tracking.log_metrics({"train_seconds": elapsed})
    final_tags = {"final_epsilon": format_epsilon(privacy["epsilon"]) if engine else "non-private",
                  "epochs_completed": epochs_done}
    for i, w in enumerate(warns):
        final_tags[f"warning.{i:02d}.{w.split(':', 1)[0]}"] = w
    with tracking.start_run(cfg.experiment, "train_gan", run_id=run_id, tags=final_tags):
        pass
    log.info("train-gan: %d epochs in %.1f s; epsilon %s; wrote %s", epochs_done, elapsed,
             info["epsilon"] if engine is None else f"{privacy['epsilon']:.3f}", out)
    return info
