"""`mammodp train-gan`: train the MCGAN on the real CBIS training patches.

Reads `data/prepared/cbis/manifest.parquet` (split `train` only: validation and test never
touch the GAN), resizes the patches to `gan.image_size` and trains the conditional DCGAN of
`mammodp.models.mcgan`.

With `gan.dp.enabled` the discriminator is trained through the project's one DP seam,
`mammodp.privacy.make_private` (see `mcgan.PairedDiscriminator` for what a record's gradient
is): secret Poisson sampling of privacy records (`dp.privacy_unit`: a patch, or all of a
patient's patches) unless `gan.dp.reproducible_noise`, OS-seeded noise that is never
checkpointed, the accountant of `gan.dp.accountant` with a recorded PRV -> RDP fallback. The
generator is post-processing. `gan.json` carries the privacy record, including the
accountant history that `mammodp train` composes with the classifier's (end-to-end epsilon).

Under DP nothing computed on real patches leaves the run except through DP-SGD: no loss or
D(real) over real batches is logged, divergence is watched on the generator loss only, and
the real-data diversity yardstick of the mode-collapse check is not computed (sample
diversity, a function of the generator alone, is logged instead). With `gan.dp.public_data`
a public in-domain set (disjoint patients) supplies that yardstick, and with
`gan.dp.public_epochs` > 0 both networks are first trained on it without DP (warm start):
from scratch, DP-SGD at demo size collapses the generator. A non-private GAN logs all
of these; they are releases of private data without DP and its run says so
(`privacy/what_epsilon_covers.txt`).

Non-private runs with `gan.feature_matching` > 0 add a feature-matching term to the
generator's loss (`mcgan.feature_matching_loss` on `Discriminator.texture_features` of the
fakes vs the step's real batch); a DP run ignores it, so its generator never reads a real patch.

Outputs in OUT (default `models/mcgan`):
- `generator.pt`: the final generator (weights + spec + provenance), read by `synthesize`;
  with `gan.ema_decay` > 0 the moving average of the generator's iterates
  (`mcgan.GeneratorEMA`), which the sample grids show too;
- `gan.json`: run id, epsilon, delta, the privacy record (engine summary + accountant
  history), trained_on, sizes;
- `checkpoint.pt`: training state every `gan.checkpoint_every` epochs (`--resume` continues
  the optimisers, the accountant and the MLflow run). Plain tensors and containers only:
  it loads with `torch.load(weights_only=True)`. With OS-seeded DP randomness it holds
  neither the noise generator's nor the Poisson sampler's state (a resumed run draws fresh
  secret batches and noise); with `reproducible_noise` it holds both;
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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammodp.config import Config, flatten, format_epsilon
from mammodp.errors import ConfigError, DataError
from mammodp.runtime import to_device

log = logging.getLogger(__name__)

CLASS_NAMES = {0: "benign", 1: "malignant"}
GRID_PER_CLASS = 16  # samples per class in each grid (4 x 4)
OUTPUT_FILES = ("generator.pt", "gan.json", "checkpoint.pt", "history.csv")
HISTORY_COLUMNS = ("loss_d", "loss_g", "d_real", "d_fake")

# What the GAN run's privacy covers (logged as privacy/what_epsilon_covers.txt).
DP_NOTE = (
    "epsilon covers the real CBIS training patches (split train) that trained the discriminator "
    "through DP-SGD (mammodp.privacy.make_private: secret Poisson sampling of privacy records, "
    "per-record clipping, Gaussian noise), privacy unit as tagged; the generator is post-processing. "
    "No statistic of real patches is logged outside DP-SGD: losses and D(real) over real batches "
    "are not recorded, divergence is watched on the generator loss, and the mode-collapse yardstick "
    "(real-data diversity) is not computed. Released without DP: the number of training images "
    "and the manifest hash (lineage)."
)
PUBLIC_NOTE = (
    " Public data, outside what epsilon covers and needing none: the public set {manifest} ({n} patches, "
    "sharing no patient with any private or test split) trained both networks without DP for {epochs} "
    "epoch(s) before the DP epochs (warm start), and its diversity is the mode-collapse yardstick."
)
PUBLIC_TRAINING_NOTE = (
    " Public data trained it too (gan.train_on_public): the public set {manifest} ({n} patches, sharing no "
    "patient with any private or test split) joined the real training patches."
)
NON_DP_NOTE = (
    "NOT private: the GAN trained on the real CBIS training patches without DP, so no epsilon covers "
    "it or any synthetic data it makes. Its diagnostics are computed on real batches and released "
    "without DP: per-step losses and D(real) (MLflow metrics), their epoch means (history.csv), and "
    "the real-data diversity per class (mode-collapse warnings and tags)."
)


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


def load_training_images(cfg: Config, privacy_unit: str = "patch"):
    """Real training patches as (images (N,1,S,S) in [-1, 1], labels (N,), record ids (N,)).

    Record ids name each patch's privacy record: the patch itself, or its patient.
    """
    from mammodp.data.datasets import PatchTable

    table = PatchTable.load(manifest_path(cfg), splits=["train"])
    images, labels = table.tensors()
    labels = labels.clone()
    if set(np.unique(labels.numpy())) - {0, 1}:
        raise DataError("labels must be 0 (benign) or 1 (malignant)", path=manifest_path(cfg))
    return _resize_for_gan(images, cfg.gan.image_size), labels, table.record_ids(privacy_unit)


def _resize_for_gan(images, size: int):
    """(N, 1, H, W) patches in [0, 1] -> (N, 1, size, size) in [-1, 1]."""
    from torch.nn import functional as F

    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (images * 2.0 - 1.0).contiguous()


def load_public_images(cfg: Config):
    """The public set of `gan.dp.public_data` (every split: all of it is public) for the GAN.

    Returns (images (N,1,S,S) in [-1, 1], labels (N,), lineage dict).

    Raises:
        DataError: no prepared manifest in the folder (e.g. `pretrain.enabled: false` left it
            empty), labels other than 0/1, or a patient shared with a private or test split.
    """
    from mammodp import tracking
    from mammodp.data.datasets import PatchTable, read_manifest_table
    from mammodp.data.manifest import check_public_disjoint, private_manifests
    from mammodp.data.manifest import manifest_path as prepared_manifest

    folder = Path(str(cfg.gan.dp.public_data))
    path = prepared_manifest(folder / "prepared")
    if not path.is_file():
        raise DataError("gan.dp.public_data names no prepared public set (expected the output of "
                        "`mammodp phantom --public` or a prepared public set here)", path=path)
    df = read_manifest_table(path)
    check_public_disjoint(df, path, private_manifests(cfg.data.prepared_dir), "pretrain.patient_offset")
    table = PatchTable.from_frame(df)
    images, labels = table.tensors()
    if set(np.unique(labels.numpy())) - {0, 1}:
        raise DataError("labels must be 0 (benign) or 1 (malignant)", path=path)
    info = {"manifest": str(path), "manifest_hash": tracking.manifest_hash(path), "n_images": int(len(labels)),
            "epochs": int(cfg.gan.dp.public_epochs)}
    return _resize_for_gan(images, cfg.gan.image_size), labels.clone(), info


def _public_warm_start(G, D, images, labels, cfg: Config, dev) -> list[dict[str, float]]:
    """`gan.dp.public_epochs` non-private epochs on the public set; returns per-epoch mean losses.

    Its own Adam pair (the DP phase starts with fresh optimiser state) and its own seeded
    streams: nothing here reads a private record.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm import tqdm

    from mammodp.data.datasets import random_flips
    from mammodp.models import mcgan

    g = cfg.gan
    opt_g = torch.optim.Adam(G.parameters(), lr=g.lr, betas=g.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=g.lr, betas=g.betas)
    rng = torch.Generator().manual_seed(cfg.seed + 5)
    loader = DataLoader(TensorDataset(images, labels), batch_size=g.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed + 6), drop_last=False)
    rows = []
    for epoch in tqdm(range(g.dp.public_epochs), desc="train-gan public warm start", unit="epoch"):
        sums = {"loss_d": 0.0, "loss_g": 0.0}  # summed on the device (float64), read once an epoch
        for x, y in loader:
            x = to_device(random_flips(x, generator=rng), dev)
            stats = mcgan.discriminator_step(D, G, opt_d, x, to_device(y, dev), label_range=g.real_label_range,
                                             generator=rng)
            stats |= mcgan.generator_step(G, D, opt_g, batch=g.batch_size, device=dev, generator=rng)
            for k in sums:
                sums[k] = sums[k] + torch.as_tensor(stats[k], dtype=torch.float64)
        rows.append({"epoch": epoch + 1, **{k: v / len(loader) for k, v in mcgan.read_stats(sums).items()}})
        if not all(math.isfinite(v) for v in rows[-1].values()):
            raise DataError(f"the public warm start diverged at epoch {epoch + 1} ({rows[-1]}); lower gan.lr "
                            "or gan.dp.public_epochs", path=Path(str(g.dp.public_data)))
    return rows


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
        # Tensors and plain containers only: no pickled objects are executed on load.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"unreadable checkpoint: {exc}", path=path) from exc


def _check_resumable(ckpt: dict[str, Any], cfg: Config, spec) -> None:
    """A checkpoint continues only the run it came from: same nets, data rate and privacy."""
    saved = ckpt["config"]
    now = flatten(cfg.gan) | {"privacy_unit": cfg.dp.privacy_unit}
    keys = ("image_size", "latent_dim", "width", "batch_size", "betas", "ema_decay", "train_on_public",
            "feature_matching", "dp.enabled",
            "dp.epsilon", "dp.delta", "dp.max_grad_norm", "dp.accountant", "dp.reproducible_noise",
            "dp.public_data", "dp.public_epochs", "dp.optimizer", "dp.lr", "dp.momentum", "dp.betas")
    for key in keys:
        if saved.get(key) != now.get(key):
            raise ConfigError(
                f"checkpoint was trained with {saved.get(key)!r}, params say {now.get(key)!r}; "
                "run without --resume to start afresh", field=f"gan.{key}")
    if cfg.gan.dp.enabled and saved.get("privacy_unit") != now["privacy_unit"]:
        raise ConfigError(f"checkpoint was trained with privacy unit {saved.get('privacy_unit')!r}; "
                          "run without --resume to start afresh", field="dp.privacy_unit")
    if dataclasses.asdict(spec) != ckpt["spec"]:
        raise ConfigError("checkpoint networks differ from params; run without --resume", field="gan")


def _engine_state(engine, secret: bool) -> dict[str, Any]:
    """The DP engine's checkpoint state; with secret randomness, without the sampler's RNG.

    The Poisson sampler's generator state would let a checkpoint reader replay (or, for a
    Mersenne twister, reconstruct) which records past batches held. The engine already
    omits an OS-seeded noise stream; the sampler's is dropped here and reseeded from the OS
    on resume (fresh secret Poisson draws are as valid as the lost ones).
    """
    state = engine.state_dict()
    if secret:
        state["sampler"] = dict(state["sampler"], generator=None)
    return state


def _load_engine_state(engine, state: dict[str, Any]) -> None:
    """Restore `_engine_state`, reseeding a dropped sampler RNG from the OS."""
    import torch

    state = dict(state)
    if state["sampler"].get("generator") is None:
        fresh = torch.Generator()
        fresh.seed()
        state["sampler"] = dict(state["sampler"], generator=fresh.get_state())
    engine.load_state_dict(state)


def make_dp_discriminator(D, opt_d, cfg: Config, record_ids: np.ndarray, dev):
    """The DP engine over the paired discriminator (see `mcgan.PairedDiscriminator`).

    Poisson sampling and noise are seeded from the OS unless `gan.dp.reproducible_noise`.
    """
    from mammodp.models import mcgan
    from mammodp.privacy.engine import make_private

    g = cfg.gan
    seed = cfg.seed if g.dp.reproducible_noise else None
    return make_private(
        mcgan.PairedDiscriminator(D), opt_d, record_ids=record_ids, expected_batch_size=g.batch_size,
        delta=g.dp.delta, epochs=g.epochs, max_grad_norm=g.dp.max_grad_norm, target_epsilon=g.dp.epsilon,
        accountant=g.dp.accountant, privacy_unit=cfg.dp.privacy_unit, noise_seed=seed, sampler_seed=seed,
        grad_chunk=cfg.dp.grad_chunk, physical_batch_size=max(g.batch_size * 4, cfg.dp.grad_chunk),
        per_sample_method="vmap",  # conv discriminator: the torch.func route
    )


def privacy_record(engine) -> dict[str, Any]:
    """What `gan.json` says of a DP run: the engine's summary plus its accountant history."""
    return {**engine.summary(), "dp": True, "accountant_state": engine.accountant.state_dict()}


def run(cfg: Config, out: Path = Path("models/mcgan"), resume: bool = False, device: str | None = None) -> dict:
    """Train the MCGAN and write OUT; returns the content of `gan.json`.

    Args:
        cfg: the whole config (reads `gan`, `dp.privacy_unit`, `dp.grad_chunk`,
            `data.prepared_dir`, `seed`, `experiment`).
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
    private = g.dp.enabled
    seed_everything(cfg.seed)
    images, labels, record_ids = load_training_images(cfg, cfg.dp.privacy_unit)
    n = len(labels)
    lineage = trained_on(cfg, n)
    G, D, spec = mcgan.create_gan(image_size=g.image_size, latent_dim=g.latent_dim, width=g.width, dp=private,
                                     upsample=g.upsample, d_stem=g.d_stem)
    # channels_last: oneDNN's (and cuDNN's) preferred layout for these small convolutions; on
    # CPU a demo step takes 110 ms instead of 175 ms, with the same numbers up to rounding.
    G, D = (m.to(dev, memory_format=torch.channels_last) for m in (G, D))
    # DP: Adam's betas from gan.dp.betas (why: config.GanDPConfig.betas), and the
    # discriminator's optimiser by gan.dp.optimizer (why SGD: config.GanDPConfig.optimizer).
    betas = g.dp.betas if private else g.betas
    amp = bool(g.amp and dev.type == "cuda" and not private)  # per-sample gradients stay fp32
    # Under AMP, fused Adam: GradScaler.step then hands it the inf check on the device; with
    # any other optimiser it reads the check back (`.item()`), a wait for the device per step.
    fused = True if amp else None
    opt_g = torch.optim.Adam(G.parameters(), lr=g.lr, betas=betas, fused=fused)
    opt_d = (torch.optim.SGD(D.parameters(), lr=g.dp.lr, momentum=g.dp.momentum)
             if private and g.dp.optimizer == "sgd"
             else torch.optim.Adam(D.parameters(), lr=g.lr, betas=betas, fused=fused))

    ckpt = None
    if resume:
        ckpt = _load_checkpoint(out)
        _check_resumable(ckpt, cfg, spec)
    else:
        _clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)

    # Public data under DP: the warm start and the mode-collapse yardstick (a resumed run's
    # networks already hold the warm start). Non-private with gan.train_on_public: the public
    # set joins the training patches instead (the yardstick is then theirs and the real ones').
    public = None
    if g.dp.public_data and (private or g.train_on_public):
        pub_images, pub_labels, public = load_public_images(cfg)
        if not private:
            public["use"] = "training data"
            public.pop("epochs")
            images, labels = torch.cat([images, pub_images]), torch.cat([labels, pub_labels])
            n = len(labels)
            log.info("train-gan: %d private + %d public training patches", lineage["n_images"], public["n_images"])
        elif g.dp.public_epochs > 0 and not resume:
            public["history"] = _public_warm_start(G, D, pub_images, pub_labels, cfg, dev)
            last = public["history"][-1]
            log.info("train-gan: public warm start, %d epochs on %d public patches (loss_d %.3f, loss_g %.3f)",
                     g.dp.public_epochs, public["n_images"], last["loss_d"], last["loss_g"])

    if private and g.feature_matching > 0:
        log.info("train-gan: gan.feature_matching %g is ignored under DP (the generator step reads no real patch)",
                 g.feature_matching)
    # The generator that is saved: the average of the iterates from here on (after any warm start).
    ema = mcgan.GeneratorEMA(G, g.ema_decay) if g.ema_decay > 0 else None
    engine = None
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    loader = None
    if private:
        engine = make_dp_discriminator(D, opt_d, cfg, record_ids, dev)
    else:
        loader = DataLoader(TensorDataset(images, labels), batch_size=g.batch_size, shuffle=True,
                            generator=loader_gen, drop_last=False)
    secret = private and not g.dp.reproducible_noise
    scaler = torch.amp.GradScaler("cuda") if amp else None
    # Non-private: one stream for z, fake labels, targets, flips. DP: per-sample draws for every
    # training sample at every step (independent of the Poisson draw), and a separate public
    # stream for the generator's steps.
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    rng_g = torch.Generator().manual_seed(cfg.seed + 4)
    fixed_z = torch.randn(GRID_PER_CLASS, g.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 2))

    # Real diversity per class, the yardstick of mode collapse: a statistic of real patches, so
    # without DP only; under DP it comes from the public set when there is one.
    real_div: dict[int, float] = {}
    yard_images, yard_labels = (images, labels) if not private else \
        ((pub_images, pub_labels) if public is not None else (None, None))
    if yard_images is not None:
        pick = torch.Generator().manual_seed(cfg.seed + 3)
        for c in (0, 1):
            idx = torch.nonzero(yard_labels == c).view(-1)
            idx = idx[torch.randperm(len(idx), generator=pick)[:64]]
            if len(idx) > 1:
                real_div[c] = mcgan.pairwise_diversity((yard_images[idx] + 1) / 2)

    start_epoch, step, history, run_id, warns = 0, 0, [], None, []
    if ckpt is not None:
        G.load_state_dict(ckpt["G"])
        D.load_state_dict(ckpt["D"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if engine is not None:
            _load_engine_state(engine, ckpt["dp"])
        rng.set_state(ckpt["rng"])
        rng_g.set_state(ckpt["rng_g"])
        loader_gen.set_state(ckpt["loader_gen"])
        torch.set_rng_state(ckpt["torch_rng"])
        if torch.cuda.is_available() and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        run_id, warns = ckpt["run_id"], list(ckpt.get("warnings", []))
        log.info("resuming from epoch %d (step %d) of %s", start_epoch, step, out / "checkpoint.pt")

    target_eps = g.dp.epsilon if private else math.inf
    tags = {"epsilon": format_epsilon(target_eps), "seed": cfg.seed, "device": dev.type,
            "trained_on": lineage["text"]}
    if private:
        tags["private_data_without_dp"] = "false"
        tags.update({"delta": g.dp.delta, "accountant": g.dp.accountant, "privacy_unit": cfg.dp.privacy_unit,
                     "noise_seeded": str(not secret).lower()})
        if public is not None:
            tags["public_data"] = f"{public['manifest']} sha256:{public['manifest_hash']} n={public['n_images']}"
            tags["public_warm_start_epochs"] = g.dp.public_epochs
    else:
        # Same flag as every other run that touched private data without DP.
        tags["private_data_without_dp"] = "true"
        tags["private_data_note"] = "GAN trained on real patches without DP"
        if public is not None:
            tags["public_data"] = (f"{public['manifest']} sha256:{public['manifest_hash']} n={public['n_images']} "
                                   "(training data)")
    params = {f"gan.{k}": v for k, v in flatten(g).items()} | {"seed": cfg.seed, "n_train": n}
    if private:
        params |= {"dp.privacy_unit": cfg.dp.privacy_unit, "noise_multiplier": engine.noise_multiplier,
                   "sample_rate": engine.sample_rate, "n_records": engine.sampler.n_records}

    def snapshot(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch, "step": step, "history": history, "run_id": run_id, "warnings": warns,
            "config": flatten(g) | {"privacy_unit": cfg.dp.privacy_unit}, "spec": dataclasses.asdict(spec),
            "G": G.state_dict(), "D": D.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "dp": _engine_state(engine, secret) if engine is not None else None,
            "rng": rng.get_state(), "rng_g": rng_g.get_state(), "loader_gen": loader_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def warn(kind: str, message: str, epoch: int) -> None:
        # A metric now (visible while the run is live), a tag when the run is closed.
        log.warning("%s: %s", kind, message)
        warns.append(f"{kind}: {message}")
        tracking.log_metrics({f"warning_{kind}": 1.0}, step=epoch)

    def dp_step() -> dict[str, float]:
        # Per-sample noise for every training sample, then the Poisson batch's rows of it.
        draws = mcgan.draw_per_sample(n, g.latent_dim, g.real_label_range, flips=True, generator=rng)
        idx = engine.sample_batch()
        inputs, targets = mcgan.dp_batch(G, images[idx], labels[idx], draws.select(idx), dev)
        engine.step(inputs, targets, mcgan.paired_bce, record_idx=idx)  # private loss: not logged
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        return mcgan.generator_step(G, D, opt_g, batch=g.batch_size, device=dev, generator=rng_g)

    def plain_steps():
        for x, y in loader:
            x, y = to_device(random_flips(x, generator=rng), dev), to_device(y, dev)
            stats = mcgan.discriminator_step(D, G, opt_d, x, y, label_range=g.real_label_range,
                                             scaler=scaler, autocast=amp, generator=rng)
            stats |= mcgan.generator_step(G, D, opt_g, batch=g.batch_size, device=dev, scaler=scaler,
                                          autocast=amp, generator=rng, real=x, real_labels=y,
                                          feature_matching=g.feature_matching)
            if scaler is not None:
                scaler.update()
            # An empty batch has no discriminator loss (NaN by design), not a divergence.
            yield stats, (("loss_d", "loss_g") if x.shape[0] else ("loss_g",))

    def epoch_steps():
        if engine is None:
            yield from plain_steps()
            return
        for _ in range(engine.steps_per_epoch):
            yield dp_step(), ("loss_g",)  # only public quantities are watched under DP

    note = DP_NOTE if private else NON_DP_NOTE
    if public is not None and not private:
        note += PUBLIC_TRAINING_NOTE.format(manifest=public["manifest"], n=public["n_images"])
    elif public is not None:
        note += PUBLIC_NOTE.format(manifest=public["manifest"], n=public["n_images"], epochs=g.dp.public_epochs)
    t0 = time.perf_counter()
    with tracking.start_run(
        cfg.experiment, "train_gan", name=tracking.run_name("train_gan", epsilon=target_eps, seed=cfg.seed),
        tags=tags, params=None if run_id else params, run_id=run_id,
        description="MCGAN (malignancy-conditioned DCGAN) on real CBIS training patches. " + note,
    ) as mlrun:
        run_id = mlrun.info.run_id
        for row in (public or {}).get("history", []) if ckpt is None else []:
            tracking.log_metrics({f"public_epoch_{k}": v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        G.train()
        D.train()
        bar = tqdm(range(start_epoch, g.epochs), initial=start_epoch, total=g.epochs, desc="train-gan",
                   unit="epoch")
        stopped = False
        for epoch in bar:
            good_g = copy.deepcopy(G.state_dict())  # restored if this epoch diverges
            good_ema = ema.state_dict() if ema is not None else None
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            step_rows: list[tuple[int, dict[str, float]]] = []  # logged once per epoch (one batch)
            # A step's statistics are device tensors, read one step late: once step s is queued,
            # reading step s - 1's values lets the host prepare step s + 1 while the device runs
            # step s (read at once, each step's read made the device idle while the host drew
            # and copied the next batch). A non-finite loss is so seen one step later; the
            # epoch's generator is restored either way, and the extra step is accounted.
            pending = None  # (step, stats, watched) queued, not yet read

            def settle(entry) -> bool:
                at, raw, watched = entry
                stats = mcgan.read_stats(raw)
                step_rows.append((at, stats))
                for k, v in stats.items():
                    if math.isfinite(v):
                        sums[k] = sums.get(k, 0.0) + v
                        counts[k] = counts.get(k, 0) + 1
                bad = [k for k in watched if not math.isfinite(stats[k])]
                if bad:
                    G.load_state_dict(good_g)
                    if ema is not None:
                        ema.load_state_dict(good_ema)
                    warn("diverging_loss", f"{bad[0]} became {stats[bad[0]]} at epoch {epoch + 1}, step "
                                           f"{at}; training stopped, generator of epoch {epoch} kept",
                         epoch + 1)
                return bool(bad)

            for stats, watched in epoch_steps():
                step += 1
                if ema is not None:
                    ema.update(G)
                if pending is not None and settle(pending):
                    stopped = True
                    pending = None
                    break
                pending = (step, stats, watched)
            if pending is not None:
                stopped = settle(pending)
            tracking.log_metric_steps(step_rows)
            if stopped:
                break
            means = {k: sums[k] / counts[k] for k in sums}
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step,
                                   **{k: means.get(k, float("nan")) for k in HISTORY_COLUMNS}}
            epoch_metrics = {f"epoch_{k}": v for k, v in means.items()}
            if engine is not None:
                eps_now = engine.epsilon_spent()
                row["epsilon"] = eps_now
                epoch_metrics.update({"epsilon": eps_now, "delta": g.dp.delta, "noise_multiplier": engine.noise_multiplier,
                                      "dp_steps": engine.steps_taken, "sample_rate": engine.sample_rate})
            reason = mcgan.diverged({k: means[k] for k in ("loss_d", "loss_g") if k in means}, g.diverge_loss)
            if reason:
                warn("diverging_loss", f"epoch {epoch + 1}: {reason}", epoch + 1)
            last = epoch + 1 == g.epochs
            if (epoch + 1) % g.sample_every == 0 or last:
                ratios = []
                shown = ema.finalize(seed=cfg.seed + 7) if ema is not None else G  # what would be saved
                for c, cname in sorted(CLASS_NAMES.items()):
                    grid = mcgan.sample(shown, np.full(GRID_PER_CLASS, c), z=fixed_z)
                    fig = _grid_figure(grid, f"{cname}, epoch {epoch + 1}")
                    name = f"samples/epoch-{epoch + 1:04d}-{cname}.png"
                    fig.savefig(out / name, dpi=80)
                    tracking.log_figure(fig, name, saved=out / name)
                    div = mcgan.pairwise_diversity(grid)
                    epoch_metrics[f"sample_diversity_{cname}"] = div
                    if c in real_div:  # non-private only
                        ratios.append(div / real_div[c] if real_div[c] > 0 else float("nan"))
                        if mcgan.mode_collapse(div, real_div[c], g.collapse_threshold):
                            warn("mode_collapse", f"epoch {epoch + 1}: {cname} samples' diversity {div:.4f} is "
                                                  f"below {g.collapse_threshold:g} x real ({real_div[c]:.4f})",
                                 epoch + 1)
                if ratios:
                    epoch_metrics["diversity_ratio"] = float(np.nanmin(ratios))
                    row["diversity_ratio"] = epoch_metrics["diversity_ratio"]
            history.append(row)
            tracking.log_metrics(epoch_metrics, step=epoch + 1)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss_d", "loss_g") if math.isfinite(row[k])}
                            | ({"eps": f"{row['epsilon']:.2f}"} if engine else {}))
            if (epoch + 1) % g.checkpoint_every == 0 or last:
                _save_checkpoint(out, snapshot(epoch + 1))
        bar.close()
        # The privacy record also counts the steps of an epoch cut short by divergence.
        privacy: dict[str, Any] = privacy_record(engine) if engine is not None else {"dp": False,
                                                                                      "epsilon": "non-private"}
        elapsed = time.perf_counter() - t0
        epochs_done = history[-1]["epoch"] if history else 0
        info = {
            "run_id": run_id,
            "epsilon": privacy["epsilon"] if engine is not None else "non-private",
            "delta": g.dp.delta if engine is not None else None,
            "privacy": privacy,
            "trained_on": lineage,
            "public_data": public,
            "image_size": spec.image_size, "latent_dim": spec.latent_dim, "width": spec.width,
            "dp": spec.dp, "ema_decay": g.ema_decay, "epochs": epochs_done, "steps": step, "seed": cfg.seed,
            "device": dev.type, "train_seconds": round(elapsed, 2), "warnings": warns,
        }
        final = ema.finalize(seed=cfg.seed + 7) if ema is not None else G
        mcgan.save_generator(out / "generator.pt", final, meta=info)
        write_json(out / "gan.json", info)
        pd.DataFrame(history).to_csv(out / "history.csv", index=False)
        tracking.log_metrics({"train_seconds": elapsed})
        import mlflow

        mlflow.log_text(note, "privacy/what_epsilon_covers.txt")
        if engine is not None:
            mlflow.log_dict(privacy, "privacy/record.json")
    final_tags = {"final_epsilon": format_epsilon(privacy["epsilon"]) if engine else "non-private",
                  "epochs_completed": epochs_done}
    if engine is not None:
        final_tags |= {"accountant_used": privacy["accountant"],
                       "accountant_fallback": str(privacy["accountant_fallback"]).lower()}
        if privacy["accountant_fallback_reason"]:
            final_tags["accountant_fallback_reason"] = privacy["accountant_fallback_reason"]
    for i, w in enumerate(warns):
        final_tags[f"warning.{i:02d}.{w.split(':', 1)[0]}"] = w
    with tracking.start_run(cfg.experiment, "train_gan", run_id=run_id, tags=final_tags):
        pass
    log.info("train-gan: %d epochs in %.1f s; epsilon %s; wrote %s", epochs_done, elapsed,
             info["epsilon"] if engine is None else f"{privacy['epsilon']:.3f}", out)
    return info
