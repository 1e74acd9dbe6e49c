"""MCGAN: the malignancy-conditioned DCGAN of Study A, and its training steps.

Architecture (REFERENCE.md, "MCGAN"), for an image side S (a power of two, >= 16) and a
width w (channels of the narrowest generator layer; w = 64 is the paper's net):

- Generator: label -> Embedding(2, 50) -> Linear(50, latent) -> LeakyReLU, concatenated with
  z to a (2 * latent) x 1 x 1 tensor; ConvTranspose to w * 2**(n-1) channels at 4 x 4, then
  n - 1 stride-2 ConvTransposes halving the channels down to w at S/2, then w -> 1 at S, Tanh.
  BatchNorm + ReLU between (n = log2(S) - 2; S = 128: 1024 -> 512 -> 256 -> 128 -> 64).
- Discriminator: label -> Embedding(2, 50) -> Linear(50, S * S) as a second image channel;
  Conv 2 -> w (k6, s2) + LeakyReLU(0.1), then n - 1 stride-2 Convs doubling the channels,
  each with a norm layer, then Conv -> 1 logit at 1 x 1. The norm layer is BatchNorm for
  non-private training and GroupNorm for DP (BatchNorm mixes samples, which per-sample
  gradients cannot express).

The discriminator returns logits; the paper's final Sigmoid is folded into
`BCEWithLogitsLoss`, which is the same loss, numerically stable, and safe under autocast.
Every activation is out-of-place (Opacus >= 1.5.4 rejects in-place ops on hooked layers).

DP training of the discriminator (`discriminator_step` with an Opacus `DPOptimizer`): each
step draws one fake sample per real record (fake labels uniform, never copied from the real
batch, so they carry no private information) and pairs them: record i's loss is
BCE(D(x_i), t_i) + BCE(D(G(z_i)), 0). Opacus' `GradSampleModule` computes per-row
gradients for the 2B-row batch [real; fake]; the two rows of each pair are summed, and
`DPOptimizer` clips each pair to norm C, sums, adds Gaussian noise sigma * C and divides by
the expected batch size (Poisson sampling; the accountant advances on each step). One real
record changes exactly one pair, so the sensitivity is C. Clipping the fake term together
with its real partner keeps the two terms balanced: clipping only the real term and adding an
unclipped fake gradient lets the fake term dominate (tried: the discriminator learns to call
everything fake). The fake samples themselves depend only on the generator, which sees real
data only through the discriminator's private weights (post-processing), and on public
noise. The generator step uses no real data and runs with the per-sample hooks off.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mammodp.errors import ConfigError, WeightsError

N_CLASSES = 2  # label 1 = malignant, 0 = benign
EMBED_DIM = 50  # label embedding size (paper)
G_LEAK = 0.2  # slope of the generator's label-path LeakyReLU
D_LEAK = 0.1  # slope of the discriminator's LeakyReLUs (paper)
INIT_STD = 0.02  # N(0, 0.02) init of conv weights (DCGAN, paper)

# Named sizes. Params give image_size / latent_dim / width directly; presets are shorthands
# for code and tests (`create_gan("tiny")`).
PRESETS: dict[str, dict[str, int]] = {
    "paper": {"image_size": 128, "latent_dim": 100, "width": 64},
    "demo": {"image_size": 64, "latent_dim": 100, "width": 8},
    "tiny": {"image_size": 16, "latent_dim": 16, "width": 4},
}


@dataclass(frozen=True)
class GanSpec:
    """Everything needed to rebuild the networks (stored with every checkpoint)."""

    image_size: int = 64  # px, side of the square output
    latent_dim: int = 100  # size of z
    width: int = 64  # channels of the narrowest generator layer (64 = paper)
    dp: bool = False  # discriminator with GroupNorm (DP-compatible) instead of BatchNorm

    def __post_init__(self) -> None:
        s = self.image_size
        if s < 16 or s & (s - 1):
            raise ConfigError(f"must be a power of two >= 16, got {s}", field="gan.image_size")
        if self.width < 1:
            raise ConfigError(f"must be >= 1, got {self.width}", field="gan.width")
        if self.latent_dim < 1:
            raise ConfigError(f"must be >= 1, got {self.latent_dim}", field="gan.latent_dim")

    @property
    def n_blocks(self) -> int:
        """Normalised blocks per network: feature maps at 4, 8, ..., S/2 px."""
        return int(math.log2(self.image_size)) - 2


def _group_count(channels: int) -> int:
    """GroupNorm groups: about 4 channels per group, at most 32 (Study B's GroupNorm(32))."""
    return math.gcd(channels, min(32, max(1, channels // 4)))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """Conditional DCGAN generator: (z, label) -> image in [-1, 1]."""

    def __init__(self, spec: GanSpec):
        super().__init__()
        self.spec = spec
        n, w, latent = spec.n_blocks, spec.width, spec.latent_dim
        self.label_path = nn.Sequential(
            nn.Embedding(N_CLASSES, EMBED_DIM),
            nn.Linear(EMBED_DIM, latent),
            nn.LeakyReLU(G_LEAK, inplace=False),
        )
        chans = [w * 2 ** (n - 1 - i) for i in range(n)]  # e.g. 1024, 512, ..., 64
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(2 * latent, chans[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(chans[0]),
            nn.ReLU(inplace=False),
        ]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=False),
            ]
        layers += [nn.ConvTranspose2d(chans[-1], 1, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """z: (N, latent), labels: (N,) int64 -> (N, 1, S, S) in [-1, 1]."""
        cond = self.label_path(labels)  # (N, latent)
        x = torch.cat([z, cond], dim=1)[:, :, None, None]  # (N, 2*latent, 1, 1)
        return self.main(x)


class Discriminator(nn.Module):
    """Conditional DCGAN discriminator: (image, label) -> logit (real vs fake)."""

    def __init__(self, spec: GanSpec):
        super().__init__()
        self.spec = spec
        s, n, w = spec.image_size, spec.n_blocks, spec.width
        self.label_path = nn.Sequential(nn.Embedding(N_CLASSES, EMBED_DIM), nn.Linear(EMBED_DIM, s * s))
        layers: list[nn.Module] = [
            nn.Conv2d(2, w, 6, 2, 2, bias=False),  # k6 s2 p2 halves the side exactly
            nn.LeakyReLU(D_LEAK, inplace=False),
        ]
        c = w
        for _ in range(n - 1):
            norm = nn.GroupNorm(_group_count(2 * c), 2 * c) if spec.dp else nn.BatchNorm2d(2 * c)
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), norm, nn.LeakyReLU(D_LEAK, inplace=False)]
            c *= 2
        layers += [nn.Conv2d(c, 1, 4, 1, 0, bias=False)]  # 4 x 4 -> 1 x 1
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x: (N, 1, S, S) in [-1, 1], labels: (N,) -> logits (N,)."""
        s = self.spec.image_size
        cond = self.label_path(labels).view(-1, 1, s, s)
        return self.main(torch.cat([x, cond], dim=1)).view(-1)


def create_gan(preset: str | None = None, **sizes: Any) -> tuple[Generator, Discriminator, GanSpec]:
    """Build a generator and discriminator.

    Args:
        preset: a key of `PRESETS` (sizes to start from), or None for `GanSpec`'s defaults.
        **sizes: `image_size`, `latent_dim`, `width`, `dp` overriding the preset.

    Raises:
        ConfigError: unknown preset or size key, or sizes the architecture cannot take.
    """
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown GAN preset {preset!r}; known: {sorted(PRESETS)}", field="gan.preset")
        base.update(PRESETS[preset])
    known = {f.name for f in dataclasses.fields(GanSpec)}
    unknown = sorted(set(sizes) - known)
    if unknown:
        raise ConfigError(f"unknown GAN size {unknown[0]!r}; known: {sorted(known)}", field="gan")
    base.update(sizes)
    spec = GanSpec(**base)
    return Generator(spec), Discriminator(spec), spec


# --------------------------------------------------------------------------- training steps


def real_targets(n: int, label_range: tuple[float, float], device: torch.device,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One-sided label smoothing: real targets drawn from U(lo, hi) (paper: U(0.7, 1.2))."""
    lo, hi = label_range
    u = torch.rand(n, generator=generator)
    return (lo + (hi - lo) * u).to(device)


def random_labels(n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform class labels for fake samples (never the real batch's labels: see module doc)."""
    return torch.randint(0, N_CLASSES, (n,), generator=generator).to(device)


def discriminator_step(
    D: nn.Module,
    G: Generator,
    optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_range: tuple[float, float],
    scaler: torch.amp.GradScaler | None = None,
    autocast: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One discriminator update; private when `optimizer` is an Opacus `DPOptimizer`.

    One fake sample is drawn per real sample. In the private case each real record is
    paired with its fake (see the module docstring): the per-sample gradients of the
    2B-row batch are summed pairwise into B rows before the DP optimizer clips and noises
    them, so a record's whole contribution (real term + its fake term) has norm <= C.

    Args:
        D: the discriminator, or its Opacus `GradSampleModule` for DP training.
        G: the generator (only sampled here).
        optimizer: Adam, or the `DPOptimizer` wrapping it.
        real: (B, 1, S, S) real images in [-1, 1] (B may be 0 under Poisson sampling).
        labels: (B,) their labels.
        label_range: one-sided smoothing range of the real targets.
        scaler: AMP grad scaler (non-private CUDA runs), or None.
        autocast: run forward passes under CUDA autocast (non-private only).
        generator: CPU torch.Generator for z, fake labels and targets.

    Returns:
        `loss_d` (mean real term + mean fake term), `loss_d_real`, `loss_d_fake`, `d_real`,
        `d_fake` (mean sigmoid outputs; NaN for an empty batch).
    """
    from opacus.optimizers import DPOptimizer

    device = real.device
    n = real.shape[0]
    z = torch.randn(n, G.spec.latent_dim, generator=generator).to(device)
    fake_labels = random_labels(n, device, generator)
    targets = torch.cat([real_targets(n, label_range, device, generator), torch.zeros(n, device=device)])
    with torch.no_grad():
        fake = G(z, fake_labels)
    optimizer.zero_grad(set_to_none=True)
    if isinstance(optimizer, DPOptimizer):
        out, rows = paired_per_sample_gradients(D, real, labels, fake, fake_labels, targets)
        # Clip per record, sum, add N(0, (sigma C)^2), divide by the expected batch size,
        # advance the accountant, then the inner optimizer.
        optimizer.step()
        loss_real, loss_fake = rows[:n].mean(), rows[n:].mean()
    else:
        with torch.autocast(device.type, enabled=autocast):
            # Separate real and fake batches, as DCGAN's BatchNorm expects.
            out = torch.cat([D(real, labels), D(fake, fake_labels)]).float()
            rows = F.binary_cross_entropy_with_logits(out, targets, reduction="none")  # (2B,)
        loss_real, loss_fake = rows[:n].mean(), rows[n:].mean()
        loss = loss_real + loss_fake
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
        else:
            loss.backward()
            optimizer.step()
    probs = torch.sigmoid(out.detach())
    nan = float("nan")
    return {
        "loss_d": float(loss_real.detach() + loss_fake.detach()) if n else nan,
        "loss_d_real": float(loss_real.detach()) if n else nan,
        "loss_d_fake": float(loss_fake.detach()) if n else nan,
        "d_real": float(probs[:n].mean()) if n else nan,
        "d_fake": float(probs[n:].mean()) if n else nan,
    }


def paired_per_sample_gradients(
    D: nn.Module,
    real: torch.Tensor,
    labels: torch.Tensor,
    fake: torch.Tensor,
    fake_labels: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-record gradients of the paired discriminator loss, left in `p.grad_sample`.

    Args:
        D: the discriminator wrapped in Opacus' `GradSampleModule` (GroupNorm, no BatchNorm).
        real, labels: (B, 1, S, S) real images and (B,) labels.
        fake, fake_labels: (B, 1, S, S) fake images (one per real record) and their labels.
        targets: (2B,) BCE targets, real rows first.

    Returns:
        (logits (2B,), per-row BCE losses (2B,)). Afterwards every trainable parameter's
        `grad_sample` has B rows: row i is the gradient of
        BCE(D(real_i), t_i) + BCE(D(fake_i), t_{B+i}).
    """
    n = real.shape[0]
    # One forward over [real; fake]: with GroupNorm, rows do not interact.
    out = D(torch.cat([real, fake]), torch.cat([labels, fake_labels])).float()
    rows = F.binary_cross_entropy_with_logits(out, targets, reduction="none")
    # Opacus' "mean" reduction multiplies by the 2B rows it sees, so each grad_sample row is
    # that row's own gradient; max(., 1) keeps an empty Poisson batch well-defined.
    (rows.sum() / max(2 * n, 1)).backward()
    for p in D.parameters():
        if p.requires_grad:
            p.grad_sample = p.grad_sample[:n] + p.grad_sample[n:]  # row i: real_i + fake_i
    return out, rows


def generator_step(
    G: Generator,
    D: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    batch: int,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    autocast: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One generator update (non-saturating loss: fakes labelled real).

    With a DP discriminator (`GradSampleModule`) its per-sample hooks are switched off: the
    generator's loss involves no real data, and the discriminator's gradients from this pass
    are discarded at the next discriminator step.
    """
    hooks = hasattr(D, "disable_hooks")
    if hooks:
        D.disable_hooks()
    try:
        optimizer.zero_grad(set_to_none=True)
        z = torch.randn(batch, G.spec.latent_dim, generator=generator).to(device)
        fake_labels = random_labels(batch, device, generator)
        with torch.autocast(device.type, enabled=autocast):
            out = D(G(z, fake_labels), fake_labels).float()
            loss = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
        else:
            loss.backward()
            optimizer.step()
    finally:
        if hooks:
            D.enable_hooks()
    return {"loss_g": float(loss.detach())}


# --------------------------------------------------------------------------- sampling, files


@torch.no_grad()
def sample(
    G: Generator,
    labels: np.ndarray | torch.Tensor,
    *,
    seed: int | None = None,
    z: torch.Tensor | None = None,
    batch: int = 256,
) -> np.ndarray:
    """Generate images in eval mode (BatchNorm running statistics, so each image depends
    only on its own z and label, not on the batch).

    Args:
        G: the generator.
        labels: (N,) class labels.
        seed: seeds a CPU generator for z (same seed + same weights -> same images).
        z: explicit (N, latent) noise instead of `seed`.
        batch: images per forward pass.

    Returns:
        float32 (N, 1, S, S) in [0, 1].
    """
    device = next(G.parameters()).device
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if z is None:
        gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
        z = torch.randn(len(labels), G.spec.latent_dim, generator=gen)
    was_training = G.training
    G.eval()
    try:
        out = [
            G(z[i : i + batch].to(device), labels[i : i + batch].to(device)).float().cpu()
            for i in range(0, len(labels), batch)
        ]
    finally:
        G.train(was_training)
    images = torch.cat(out) if out else torch.zeros(0, 1, G.spec.image_size, G.spec.image_size)
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0).numpy().astype(np.float32)


def save_generator(path: str | Path, G: Generator, meta: dict[str, Any] | None = None) -> None:
    """Save a generator's weights with its spec (and optional metadata) via an atomic rename."""
    from mammodp.io import atomic_path

    state = {k: v.detach().cpu() for k, v in G.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"spec": dataclasses.asdict(G.spec), "state_dict": state, "meta": meta or {}}, tmp)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, dict[str, Any]]:
    """Rebuild a generator saved by `save_generator`; returns (generator in eval mode, meta).

    Raises:
        WeightsError: the file is missing, unreadable, or not a saved MCGAN generator.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError("generator checkpoint not found (run `mammodp train-gan` first)", path=p)
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
        spec = GanSpec(**blob["spec"])
        G = Generator(spec)
        G.load_state_dict(blob["state_dict"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise WeightsError(f"not a readable MCGAN generator checkpoint: {exc}", path=p) from exc
    return G.to(device).eval(), dict(blob.get("meta") or {})


# --------------------------------------------------------------------------- failure detection


def pairwise_diversity(images: np.ndarray | torch.Tensor, size: int = 32) -> float:
    """Mean pairwise L2 distance between images (downsampled to `size` px, per pixel RMS).

    A collapsed generator produces near-identical samples whatever z is, so its samples'
    diversity falls far below that of real images.
    """
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.ndim == 3:
        x = x[:, None]
    if x.shape[0] < 2:
        return float("nan")
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    flat = x.reshape(x.shape[0], -1)
    d = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1)))


def mode_collapse(sample_diversity: float, real_diversity: float, threshold: float) -> bool:
    """True when the samples' diversity is below `threshold` x the real data's."""
    if not (math.isfinite(sample_diversity) and math.isfinite(real_diversity)) or real_diversity <= 0:
        return False
    return sample_diversity < threshold * real_diversity


def diverged(losses: dict[str, float], limit: float) -> str | None:
    """Name the first loss that is non-finite or above `limit`, with its value; else None."""
    for name, value in losses.items():
        if not math.isfinite(value):
            return f"{name} is {value}"
        if value > limit:
            return f"{name} = {value:.3g} exceeds {limit:g}"
    return None
