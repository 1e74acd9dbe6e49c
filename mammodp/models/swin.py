"""Swin Transformer classifiers built by preset name (timm backbones, MLP head).

Presets are data: a dict of sizes per name, as in timm's model registry. The module that
`create_classifier` returns is the single place where input normalisation lives: it takes
greyscale patches in [0, 1] at any size and returns two logits (benign, malignant), so
training, evaluation and serving all feed it the same raw patches.

Privacy-relevant design choices:
- drop-path and dropout are 0 (stochastic layers would need per-sample randomness under
  `torch.func.vmap` and add nothing a DP run can afford);
- no BatchNorm (Swin uses LayerNorm), so per-sample gradients are well defined;
- out-of-place activations only (Opacus >= 1.5.4 rejects in-place ops on hooked layers).

Pretrained weights come only from a local file; nothing here downloads anything.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mammodp.errors import ConfigError, WeightsError

# timm `SwinTransformer` keyword arguments per preset, plus what the wrapper needs:
# img_size (px, square input of the backbone), in_chans (1, or 3 = greyscale replicated),
# mean / std (normalisation of the [0, 1] input), feature_dim (pooled backbone output).
PRESETS: dict[str, dict[str, Any]] = {
    # ~96k parameters at 64 px: the CPU demo / test model. Grid 16x16 -> 8x8 -> 4x4 tokens,
    # window 4 (shifted windows in the first two stages).
    "swin_micro": {
        "img_size": 64,
        "in_chans": 1,
        "mean": 0.5,
        "std": 0.5,
        "feature_dim": 64,
        "backbone": {
            "patch_size": 4,
            "window_size": 4,
            "embed_dim": 16,
            "depths": (2, 2, 1),
            "num_heads": (1, 2, 4),
        },
    },
    # Swin-T as in the paper (swin_tiny_patch4_window7_224): 224 px, 3 channels, 768 features.
    "swin_tiny": {
        "img_size": 224,
        "in_chans": 3,
        "mean": 0.5,
        "std": 0.5,
        "feature_dim": 768,
        "backbone": {
            "patch_size": 4,
            "window_size": 7,
            "embed_dim": 96,
            "depths": (2, 2, 6, 2),
            "num_heads": (3, 6, 12, 24),
        },
    },
}

MODES = ("full", "frozen_backbone")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class SwinClassifier(nn.Module):
    """Greyscale patch -> resize -> (replicate to RGB) -> normalise -> Swin -> MLP head.

    Attributes:
        preset: the preset name this model was built from.
        mode: `full` (everything trains) or `frozen_backbone` (only `head` trains).
        img_size: side of the square backbone input (px).
        in_chans: backbone input channels (1, or 3 = the grey channel replicated).
        backbone: timm `SwinTransformer` without classifier; returns (B, feature_dim).
        head: MLP feature_dim -> feature_dim/2 -> 2 (768 -> 384 -> 2 for Swin-T).
    """

    # timm's window partition keeps each sample's windows in consecutive rows of the folded
    # (B * windows, N, C) activations: mammodp.privacy.grad_sampler relies on it.
    dp_sample_major = True

    def __init__(self, preset: str, spec: dict[str, Any], mode: str):
        super().__init__()
        from timm.models.swin_transformer import SwinTransformer

        self.preset = preset
        self.mode = mode
        self.img_size = int(spec["img_size"])
        self.in_chans = int(spec["in_chans"])
        self.mean = float(spec["mean"])
        self.std = float(spec["std"])
        self.backbone = SwinTransformer(
            img_size=self.img_size,
            in_chans=self.in_chans,
            num_classes=0,  # no timm classifier: the backbone returns pooled features
            global_pool="avg",
            drop_rate=0.0,
            proj_drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=0.0,
            **spec["backbone"],
        )
        feat = int(spec["feature_dim"])
        if self.backbone.num_features != feat:  # a preset whose sizes disagree is a bug
            raise ConfigError(
                f"preset says feature_dim={feat} but the backbone gives {self.backbone.num_features}",
                field="model.preset",
            )
        self.feature_dim = feat
        self.head = nn.Sequential(nn.Linear(feat, feat // 2), nn.GELU(), nn.Linear(feat // 2, 2))
        if mode == "frozen_backbone":
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "SwinClassifier":
        """Set train/eval mode; a frozen backbone always stays in eval mode."""
        super().train(mode)
        if self.mode == "frozen_backbone":
            self.backbone.eval()
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, in_chans, img_size, img_size): resized, standardised, normalised."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected greyscale images (B, 1, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.img_size, self.img_size):
            # Antialiased bilinear: a downscale must not alias, an upscale is plain bilinear.
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                              antialias=True)
        # Per-patch contrast standardisation: a patch's grey levels come from a min-max of its
        # whole mammogram, so lesion contrast varies with breast density and scanner. Mapping
        # every patch to mean 0.5 / std 0.25 first made the same Swin learn several times
        # faster on the phantom (test AUROC 0.74 vs 0.45 after 20 epochs). Per sample only, so
        # it is DP-safe (no statistics shared across records).
        mu = x.mean(dim=(2, 3), keepdim=True)
        sd = x.std(dim=(2, 3), keepdim=True)
        x = 0.5 + 0.25 * (x - mu) / (sd + 1e-3)
        if self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB for ImageNet-style backbones
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, feature_dim) of greyscale patches (B, 1, H, W)."""
        return self.backbone(self.preprocess(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2) for greyscale patches (B, 1, H, W) in [0, 1] of any size."""
        return self.head(self.features(x))

    def dp_split(self):
        """(frozen feature function, trainable head, head's name prefix), or None.

        With a frozen backbone the per-sample gradient code runs the backbone once for
        the whole batch (no per-sample transform, no graph) and differentiates only the
        head per sample; in `full` mode there is nothing to split off.
        """
        if self.mode != "frozen_backbone":
            return None
        return self.features, self.head, "head."


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser (and DP-SGD) should update: those with requires_grad."""
    return [p for p in model.parameters() if p.requires_grad]


def create_classifier(
    preset: str,
    *,
    pretrained_weights: str | Path | None = None,
    mode: Literal["full", "frozen_backbone"] = "full",
) -> SwinClassifier:
    """Build a classifier from a preset name.

    Args:
        preset: a key of `PRESETS` (`swin_micro`, `swin_tiny`).
        pretrained_weights: local `.pth` / `.pt` / `.bin` (torch state dict) or `.safetensors`
            file, a hub model `hf-hub:ORG/NAME` (see `resolve_weights`), or None for random
            initialisation. Either a timm / Microsoft Swin checkpoint
            (its classifier head is ignored) or a state dict of this classifier (backbone and,
            where the shapes fit, head).
        mode: `full` trains everything; `frozen_backbone` trains only the MLP head (the
            paper's DP setting) and keeps the backbone in eval mode.

    Returns:
        The classifier (CPU, train mode).

    Raises:
        ConfigError: unknown preset or mode.
        WeightsError: the weights file is missing, unreadable or does not fit.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}", field="model.preset")
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; known: {', '.join(MODES)}", field="model.mode")
    model = SwinClassifier(preset, copy.deepcopy(PRESETS[preset]), mode)
    if pretrained_weights is not None:
        load_weights(model, pretrained_weights)
    return model.train()


# --------------------------------------------------------------------------- weights


HF_HUB_PREFIX = "hf-hub:"
# Files a timm model repository on the Hugging Face Hub holds its weights in, in order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_weights(spec: str | Path) -> Path:
    """The local file behind a weights setting: a path as is, or a hub model through the cache.

    `hf-hub:ORG/NAME[@REVISION]` (timm's naming, e.g.
    `hf-hub:timm/swin_tiny_patch4_window7_224.ms_in1k`) is resolved by huggingface_hub: from
    its local cache (`HF_HUB_CACHE` / `HF_HOME`), downloading only when online. With
    `HF_HUB_OFFLINE=1` nothing is downloaded and a model missing from the cache is an error
    naming it.

    Raises:
        WeightsError: the hub model is not cached (offline), does not exist, or holds no weights file.
    """
    text = str(spec)
    if not text.startswith(HF_HUB_PREFIX):
        return Path(spec)
    repo, _, revision = text[len(HF_HUB_PREFIX):].partition("@")
    if not repo or repo.count("/") != 1:
        raise WeightsError(f"hub model must be written hf-hub:ORG/NAME[@REVISION], got {text!r}",
                           field="model.pretrained_weights")
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    missing = []
    for filename in HF_WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision or None))
        except EntryNotFoundError:
            missing.append(filename)
        except LocalEntryNotFoundError:
            missing.append(filename)
            continue
        except RepositoryNotFoundError as exc:
            raise WeightsError(f"hub model {repo!r} does not exist (or needs a token)",
                               field="model.pretrained_weights") from exc
        except OSError as exc:  # network and file-system failures of the download
            raise WeightsError(f"hub model {repo!r} could not be fetched: {type(exc).__name__}: {exc}",
                               field="model.pretrained_weights") from exc
    if offline:
        raise WeightsError(f"hub model {repo!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                           f"forbids downloading it (looked for {', '.join(missing)}); download it once online, "
                           "or point model.pretrained_weights at a local file", field="model.pretrained_weights")
    raise WeightsError(f"hub model {repo!r} has none of {', '.join(HF_WEIGHT_FILES)} (or the hub is unreachable "
                       "and it is not cached)", field="model.pretrained_weights")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file; unwraps {'model': ...} / {'state_dict': ...}."""
    if not path.is_file():
        raise WeightsError("pretrained weights file not found", path=path)
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(f"unsupported weights format {suffix!r}; use one of {', '.join(WEIGHT_SUFFIXES)}",
                           path=path)
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means the file is not usable weights
        raise WeightsError(f"cannot read weights: {type(exc).__name__}: {exc}", path=path) from exc
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError("file does not hold a state dict of tensors", path=path)
    return sd


def _summary(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)} ({shown}{', ...' if len(names) > limit else ''})"


def load_weights(model: SwinClassifier, path: str | Path) -> None:
    """Load a local weights file into `model` (see `create_classifier`).

    Raises:
        WeightsError: missing or unreadable file, or keys / shapes that do not fit the
            backbone (the message lists missing, unexpected and mismatched keys).
    """
    path = resolve_weights(path)
    sd = _read_state_dict(path)
    if any(k.startswith("backbone.") for k in sd):
        # A mammodp classifier state dict (what `model.state_dict()` saves).
        backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        head_sd = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
        other = [k for k in sd if not k.startswith(("backbone.", "head."))]
    else:
        # A timm / Microsoft Swin checkpoint: timm's own filter renames old layouts, drops
        # non-persistent buffers and resizes bias tables / patch-embed kernels if needed.
        from timm.models.swin_transformer import checkpoint_filter_fn

        try:
            filtered = checkpoint_filter_fn(sd, model.backbone)
        except Exception as exc:  # timm could not adapt it: the file does not fit this preset
            raise WeightsError(f"weights do not fit preset {model.preset!r}: {type(exc).__name__}: {exc}",
                               path=path) from exc
        backbone_sd = {k: v for k, v in filtered.items() if not k.startswith("head.")}
        head_sd, other = {}, []

    expected = model.backbone.state_dict()
    missing = sorted(set(expected) - set(backbone_sd))
    unexpected = sorted((set(backbone_sd) - set(expected)) | {f"(top level) {k}" for k in other})
    mismatched = sorted(
        f"{k} {tuple(backbone_sd[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(backbone_sd)
        if backbone_sd[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_summary(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_summary(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {_summary(mismatched)}")
        raise WeightsError(
            f"weights do not fit the {model.preset!r} backbone: " + "; ".join(parts)
            + " (expected a timm/Microsoft Swin checkpoint or a mammodp classifier state dict)",
            path=path,
        )
    model.backbone.load_state_dict(backbone_sd, strict=True)
    head_expected = model.head.state_dict()
    head_fits = set(head_sd) == set(head_expected) and all(
        head_sd[k].shape == head_expected[k].shape for k in head_expected
    )
    if head_fits:  # a head of another shape (e.g. 1000 ImageNet classes) is ignored
        model.head.load_state_dict(head_sd, strict=True)


__all__ = ["PRESETS", "MODES", "SwinClassifier", "create_classifier", "load_weights", "trainable_parameters"]
