"""MCGAN: the malignancy-conditioned DCGAN of Study A, and its training steps.

Architecture (REFERENCE.md, "MCGAN"), for an image side S (a power of two, >= 16) and a
width w (channels of the narrowest generator layer; w = 64 is the paper's net):

- Generator: label -> Embedding(2, 50) -> Linear(50, latent) -> LeakyReLU, concatenated with
  z to a (2 * latent) x 1 x 1 tensor; ConvTranspose to w * 2**(n-1) channels at 4 x 4, then
  n - 1 x2 upsamplings halving the channels down to w at S/2, then w -> 1 at S, Tanh. The paper
  upsamples with stride-2 ConvTransposes (`upsample: transposed`); the default resizes then
  convolves (`resize_conv`), which paints no checkerboard (GanSpec.upsample).
  BatchNorm + ReLU between (n = log2(S) - 2; S = 128: 1024 -> 512 -> 256 -> 128 -> 64).
- Discriminator: label -> Embedding(2, 50) -> Linear(50, S * S) as a second image channel;
  [with `d_stem`: Conv 2 -> w (k3, s1) + LeakyReLU(0.1) at full resolution, then w ->]
  Conv 2 -> w (k6, s2) + LeakyReLU(0.1), then n - 1 stride-2 Convs doubling the channels,
  each with a norm layer, then Conv -> 1 logit at 1 x 1. The norm layer is BatchNorm for
  non-private training and GroupNorm for DP (BatchNorm mixes samples, which per-sample
  gradients cannot express).

The discriminator returns logits; the paper's final Sigmoid is folded into
`BCEWithLogitsLoss`, which is the same loss, numerically stable, and safe under autocast.
Every activation is out-of-place (Opacus >= 1.5.4 rejects in-place ops on hooked layers).

DP training of the discriminator goes through the project's one DP seam,
`mammodp.privacy.make_private`, with `PairedDiscriminator` as the private model. What one
record's gradient is (the choice, and why):

- a record is a real patch (privacy unit `patch`) or all patches of one patient (`patient`);
- each real sample x_i of a record is PAIRED with one fake: the sample's loss is
  BCE(D(x_i, y_i), t_i) + BCE(D(G(z_i, c_i)), 0), with t_i its smoothed real target and
  (z_i, c_i) fresh public noise and a uniform fake label (never the real label);
- the record's gradient is the sum of its samples' pair gradients, clipped to norm C as a
  whole; noise N(0, sigma^2 C^2) is added once to the sum over records.

Why the fake term rides with its real partner instead of being a separate public gradient:
the fake term is post-processing (it depends only on the generator, which sees real data
only through the discriminator's private weights, and on public noise), so adding it
unclipped would be private too; but then clipping shrinks only the real term and the fake
term dominates (tried: the discriminator learns to call everything fake). Pairing keeps the
two terms balanced under one clip.

Why a record's clipped gradient cannot depend on which other records were sampled:
- fakes are made with the generator in EVAL mode (`fakes`): BatchNorm uses its running
  statistics, so each fake depends only on its own (z_i, c_i), not on the batch;
- the discriminator has no BatchNorm under DP (GroupNorm: per-sample statistics);
- the per-sample noise (z, fake label, real target, flips) is drawn for EVERY sample of the
  training set at every step (`draw_per_sample`) and then indexed by the Poisson batch, so a
  record's draws depend only on (step, record), never on its position in the batch or on
  earlier batch sizes. The generator's own step draws from a separate stream.
The generator step uses no real data (post-processing of the private discriminator). Only a
NON-private run may add feature matching (`generator_step(feature_matching=...)`), which
compares the fakes' discriminator texture statistics with the real batch's.
"""

from __future__ import annotations

import copy
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
from mammodp.runtime import to_device

N_CLASSES = 2  # label 1 = malignant, 0 = benign
EMBED_DIM = 50  # label embedding size (paper)
G_LEAK = 0.2  # slope of the generator's label-path LeakyReLU
D_LEAK = 0.1  # slope of the discriminator's LeakyReLUs (paper)
INIT_STD = 0.02  # N(0, 0.02) init of conv weights (DCGAN, paper)

# Named sizes. Params give image_size / latent_dim / width directly; presets are shorthands
# for code and tests (`create_gan("tiny")`).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"image_size": 128, "latent_dim": 100, "width": 64, "upsample": "transposed"},
    "demo": {"image_size": 64, "latent_dim": 100, "width": 8},
    "tiny": {"image_size": 16, "latent_dim": 16, "width": 4},
}


UPSAMPLING = ("resize_conv", "transposed")


def _upsample(c_in: int, c_out: int, how: str) -> list[nn.Module]:
    """One x2 upsampling layer of the generator (see `GanSpec.upsample`)."""
    if how == "transposed":
        return [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False)]
    return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)]


@dataclass(frozen=True)
class GanSpec:
    """Everything needed to rebuild the networks (stored with every checkpoint)."""

    image_size: int = 64  # px, side of the square output
    latent_dim: int = 100  # size of z
    width: int = 64  # channels of the narrowest generator layer (64 = paper)
    dp: bool = False  # discriminator with GroupNorm (DP-compatible) instead of BatchNorm
    # Generator upsampling: `resize_conv` (nearest x2 then a 3x3 conv: every output pixel gets
    # the same number of kernel taps, so no checkerboard) or `transposed` (the paper's stride-2
    # 4x4 ConvTranspose, whose uneven kernel overlap paints a checkerboard; Odena et al. 2016).
    upsample: str = "resize_conv"
    # Discriminator stem: a stride-1 3x3 conv (2 -> w) + LeakyReLU at full resolution before the
    # first stride-2 conv. Without it the discriminator's first layer (k6, s2) is all it has at
    # pixel scale, and the generator's fine texture is left loosely constrained: from seed to seed
    # the demo's generators came out too smooth (mean |dx| 0.017 vs real 0.023) or, given a noise
    # input, too grainy (0.037). Demo, with the generator average (seeds 0 / 1 / 2): FRD
    # real-synth 96 / 76 / 129 without the stem, 72 / 64 / 91 with it.
    d_stem: bool = False

    def __post_init__(self) -> None:
        s = self.image_size
        if s < 16 or s & (s - 1):
            raise ConfigError(f"must be a power of two >= 16, got {s}", field="gan.image_size")
        if self.width < 1:
            raise ConfigError(f"must be >= 1, got {self.width}", field="gan.width")
        if self.latent_dim < 1:
            raise ConfigError(f"must be >= 1, got {self.latent_dim}", field="gan.latent_dim")
        if self.upsample not in UPSAMPLING:
            raise ConfigError(f"unknown upsampling {self.upsample!r}; known: {', '.join(UPSAMPLING)}",
                              field="gan.upsample")

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
                *_upsample(c_in, c_out, spec.upsample),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=False),
            ]
        layers += [*_upsample(chans[-1], 1, spec.upsample), nn.Tanh()]
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
        stem: list[nn.Module] = (
            [nn.Conv2d(2, w, 3, 1, 1, bias=False), nn.LeakyReLU(D_LEAK, inplace=False)] if spec.d_stem else []
        )
        layers: list[nn.Module] = [
            *stem,
            nn.Conv2d(w if spec.d_stem else 2, w, 6, 2, 2, bias=False),  # k6 s2 p2 halves the side exactly
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

    def _inputs(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The image with its label plane as a second channel: (N, 2, S, S)."""
        s = self.spec.image_size
        return torch.cat([x, self.label_path(labels).view(-1, 1, s, s)], dim=1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x: (N, 1, S, S) in [-1, 1], labels: (N,) -> logits (N,)."""
        return self.main(self._inputs(x, labels)).view(-1)

    def texture_features(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, w, S/2, S/2): the activations after the first stride-2 conv and its LeakyReLU
        (after the stem, when there is one); no norm layer lies before them, so computing them
        touches no BatchNorm statistics. What `feature_matching_loss` compares."""
        return self.main[: 4 if self.spec.d_stem else 2](self._inputs(x, labels))


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
    return to_device(lo + (hi - lo) * u, device)


def random_labels(n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform class labels for fake samples (never the real batch's labels: see module doc)."""
    return to_device(torch.randint(0, N_CLASSES, (n,), generator=generator), device)


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
) -> dict[str, torch.Tensor]:
    """One NON-private discriminator update (the paper's DCGAN step; DP: `PairedDiscriminator`).

    Args:
        D: the discriminator.
        G: the generator (only sampled here, in its current mode, as DCGAN does).
        optimizer: the discriminator's optimiser.
        real: (B, 1, S, S) real images in [-1, 1].
        labels: (B,) their labels.
        label_range: one-sided smoothing range of the real targets.
        scaler: AMP grad scaler (CUDA), or None.
        autocast: run forward passes under CUDA autocast.
        generator: CPU torch.Generator for z, fake labels and targets.

    Returns:
        `loss_d` (mean real term + mean fake term), `loss_d_real`, `loss_d_fake`, `d_real`,
        `d_fake` (mean sigmoid outputs; NaN for an empty batch), as 0-d float32 tensors on
        the device, not read here (`read_stats` reads them: on CUDA a read waits for the
        device, so the loop reads a step's values once the next step is queued).
    """
    device = real.device
    n = real.shape[0]
    z = to_device(torch.randn(n, G.spec.latent_dim, generator=generator), device)
    fake_labels = random_labels(n, device, generator)
    targets = torch.cat([real_targets(n, label_range, device, generator), torch.zeros(n, device=device)])
    with torch.no_grad():
        fake = G(z, fake_labels)
    optimizer.zero_grad(set_to_none=True)
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
    if not n:
        nan = torch.full((), float("nan"), device=device)
        return dict.fromkeys(("loss_d", "loss_d_real", "loss_d_fake", "d_real", "d_fake"), nan)
    return {
        "loss_d": loss.detach(),
        "loss_d_real": loss_real.detach(),
        "loss_d_fake": loss_fake.detach(),
        "d_real": probs[:n].mean(),
        "d_fake": probs[n:].mean(),
    }


def read_stats(stats: dict[str, Any]) -> dict[str, float]:
    """A step's statistics as floats, in one read from the device (one wait on CUDA, not one
    per value); floats pass through."""
    tensors = [v.detach().double().reshape(()) for v in stats.values() if isinstance(v, torch.Tensor)]
    values = iter(torch.stack(tensors).tolist() if tensors else ())
    return {k: next(values) if isinstance(v, torch.Tensor) else float(v) for k, v in stats.items()}


# --------------------------------------------------------------------------- DP discriminator


class PairedDiscriminator(nn.Module):
    """The DP discriminator as the engine sees it: one sample = one (real, fake) pair.

    A sample is a (4, S, S) tensor: channel 0 the real image, 1 its label (constant plane),
    2 the paired fake image, 3 the fake's label (`pack_pairs` builds them). The forward
    returns (N, 2) logits: D(real) and D(fake). The parameters are exactly the wrapped
    discriminator's, so an optimiser over `D.parameters()` is the engine's optimiser.
    """

    def __init__(self, discriminator: Discriminator):
        super().__init__()
        if not discriminator.spec.dp:
            raise ConfigError("the DP discriminator needs GroupNorm (create_gan(..., dp=True)); BatchNorm "
                              "mixes the samples of a batch", field="gan.dp.enabled")
        self.d = discriminator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 4, S, S) packed pairs -> logits (N, 2) = [D(real), D(fake)]."""
        real_labels = x[:, 1, 0, 0].round().long()
        fake_labels = x[:, 3, 0, 0].round().long()
        return torch.stack([self.d(x[:, 0:1], real_labels), self.d(x[:, 2:3], fake_labels)], dim=1)


def pack_pairs(real: torch.Tensor, labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) real + (N,) labels + (N, 1, S, S) fakes + (N,) fake labels -> (N, 4, S, S)."""
    n, _, s, _ = real.shape
    plane = lambda lab: lab.to(real.dtype).view(n, 1, 1, 1).expand(n, 1, s, s)  # noqa: E731
    return torch.cat([real, plane(labels), fake.to(real.dtype), plane(fake_labels)], dim=1)


def paired_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over samples of BCE(real logit, t) + BCE(fake logit, 0): (N, 2) logits and targets."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1).mean()


@torch.no_grad()
def fakes(G: Generator, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fakes in EVAL mode: BatchNorm running statistics, so fake i depends on (z_i, label_i) only."""
    was_training = G.training
    G.eval()
    try:
        return G(z, labels)
    finally:
        G.train(was_training)


@dataclass
class SampleDraws:
    """The per-sample randomness of one DP step, drawn for every training sample.

    Attributes (all CPU tensors with one row per training sample):
        z: (N, latent) noise of each sample's paired fake; fake_labels: (N,) int64 its label;
        targets: (N,) smoothed real targets; flip_h, flip_v: (N,) bool flips of the real image.
    """

    z: torch.Tensor
    fake_labels: torch.Tensor
    targets: torch.Tensor
    flip_h: torch.Tensor
    flip_v: torch.Tensor

    def select(self, idx: torch.Tensor) -> "SampleDraws":
        """The rows of the samples in a batch."""
        return SampleDraws(self.z[idx], self.fake_labels[idx], self.targets[idx], self.flip_h[idx], self.flip_v[idx])


def draw_per_sample(n: int, latent_dim: int, label_range: tuple[float, float], *, flips: bool,
                    generator: torch.Generator) -> SampleDraws:
    """Draw one step's noise for ALL n training samples (a fixed amount per step).

    Indexing these by the Poisson batch gives each record draws that depend only on the
    step and the record: not on which other records were sampled, nor on earlier batch sizes.
    """
    lo, hi = label_range
    z = torch.randn(n, latent_dim, generator=generator)
    fake_labels = torch.randint(0, N_CLASSES, (n,), generator=generator)
    targets = lo + (hi - lo) * torch.rand(n, generator=generator)
    if flips:
        flip_h = torch.rand(n, generator=generator) < 0.5
        flip_v = torch.rand(n, generator=generator) < 0.5
    else:
        flip_h = flip_v = torch.zeros(n, dtype=torch.bool)
    return SampleDraws(z, fake_labels, targets, flip_h, flip_v)


def dp_batch(G: Generator, real: torch.Tensor, labels: torch.Tensor, draws: SampleDraws,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's inputs for one Poisson batch: packed (real, fake) pairs and their targets.

    Args:
        G: the generator (its fakes are made in eval mode).
        real: (B, 1, S, S) real images in [-1, 1] of the batch (B may be 0).
        labels: (B,) their labels.
        draws: `SampleDraws.select(batch)`: the batch's per-sample noise.
        device: where the pairs go.

    Returns:
        (inputs (B, 4, S, S), targets (B, 2) = [t_real, 0]).
    """
    # Every host tensor reaches the device through `to_device` (pinned: the copy is queued,
    # the host does not wait for the previous step's kernels).
    real = torch.where(to_device(draws.flip_h, real.device)[:, None, None, None], real.flip(-1), real)
    real = torch.where(to_device(draws.flip_v, real.device)[:, None, None, None], real.flip(-2), real)
    fake_labels = to_device(draws.fake_labels, device)
    fake = fakes(G, to_device(draws.z, device), fake_labels)
    inputs = pack_pairs(to_device(real, device), to_device(labels, device), fake, fake_labels)
    targets = to_device(torch.stack([draws.targets, torch.zeros_like(draws.targets)], dim=1), device)
    return inputs, targets


def feature_matching_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Squared distance between per-channel means and standard deviations (over batch and
    space) of two (N, C, H, W) feature maps: first and second moments of the discriminator's
    local texture detectors (Salimans et al. 2016's feature matching, with the spread added)."""
    fake, real = fake.float(), real.float()
    dims = (0, 2, 3)
    return ((fake.mean(dims) - real.mean(dims)).square().sum()
            + (fake.std(dims) - real.std(dims)).square().sum())


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
    real: torch.Tensor | None = None,
    real_labels: torch.Tensor | None = None,
    feature_matching: float = 0.0,
) -> dict[str, torch.Tensor]:
    """One generator update (non-saturating loss: fakes labelled real).

    Without `real` it uses no real data: under DP it is post-processing of the private
    discriminator. With `feature_matching` > 0 and a non-empty `real` batch (NON-private
    training only), `feature_matching` x `feature_matching_loss` between the discriminator's
    `texture_features` of the fakes and of that real batch is added to the loss (`loss_fm`
    reports it unweighted; `loss_g` stays the adversarial term). The gradients it leaves on
    the discriminator's parameters are cleared. Statistics are 0-d tensors on the device, as
    `discriminator_step`'s.
    """
    optimizer.zero_grad(set_to_none=True)
    z = to_device(torch.randn(batch, G.spec.latent_dim, generator=generator), device)
    fake_labels = random_labels(batch, device, generator)
    matching = feature_matching > 0 and real is not None and real.shape[0] > 1
    stats: dict[str, torch.Tensor] = {}
    with torch.autocast(device.type, enabled=autocast):
        fake = G(z, fake_labels)
        out = D(fake, fake_labels).float()
        loss = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
        total = loss
        if matching:
            with torch.no_grad():
                target = D.texture_features(real, real_labels)
            fm = feature_matching_loss(D.texture_features(fake, fake_labels), target)
            total = loss + feature_matching * fm
            stats["loss_fm"] = fm.detach()
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.step(optimizer)
    else:
        total.backward()
        optimizer.step()
    D.zero_grad(set_to_none=True)
    return {"loss_g": loss.detach(), **stats}


class GeneratorEMA:
    """An exponential moving average of the generator's weights: what `train-gan` saves.

    A GAN's generator oscillates from step to step around what the discriminator currently
    rewards; the average over the last ~1 / (1 - decay) steps is a better generator than any
    single iterate (Yazici et al. 2019, "The unusual effectiveness of averaging in GAN
    training"; StyleGAN, BigGAN). Measured on the demo (decay 0.995, seeds 0 / 1 / 2): FRD
    real-synth 112 / 93 / 124 -> 96 / 76 / 129 (README, "MCGAN" for the recipes since).

    The average holds parameters only. BatchNorm's running statistics were collected by the
    live weights, so they do not fit the averaged ones: `finalize` recollects them from
    forward passes of the averaged generator on fresh noise (no data: privacy-neutral, like
    every generator computation under DP).
    """

    def __init__(self, G: Generator, decay: float):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"must be in (0, 1), got {decay}", field="gan.ema_decay")
        self.decay = float(decay)
        self.average = copy.deepcopy(G).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, G: Generator) -> None:
        """average <- decay * average + (1 - decay) * G, parameter by parameter, in place."""
        for avg, live in zip(self.average.parameters(), G.parameters()):
            avg.lerp_(live.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.average.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.average.load_state_dict(state)

    @torch.no_grad()
    def finalize(self, *, batches: int = 16, batch: int = 64, seed: int = 0) -> Generator:
        """The averaged generator in eval mode, its BatchNorm statistics recollected from
        `batches` forward passes of `batch` fresh (z, label) draws (cumulative averages)."""
        G = self.average
        norms = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the passes below
        device = next(G.parameters()).device
        gen = torch.Generator().manual_seed(int(seed))
        G.train()
        try:
            for _ in range(batches):
                z = torch.randn(batch, G.spec.latent_dim, generator=gen).to(device)
                G(z, random_labels(batch, device, gen))
        finally:
            for m, mom in zip(norms, momenta):
                m.momentum = mom
            G.eval()
        return G


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
    labels = torch.tensor(np.asarray(labels), dtype=torch.int64)  # a copy: the caller's array may be read-only
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
        spec = GanSpec(**{"upsample": "transposed", **blob["spec"]})  # files from before upsample
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
