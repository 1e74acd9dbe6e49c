"""Typed, frozen configuration built from params.yaml.

One `@dataclass(frozen=True)` per params section. Loading rejects unknown keys, missing
keys and wrong types with a `ConfigError` naming the dotted key (`train.lr`): a plan must
state every setting (the field defaults below document typical values; they never fill in
a key a params file left out). `1e-3` is read as a number. Stages take
these objects; library modules take plain typed arguments and never read params.yaml.

Optuna varies values with `dataclasses.replace`; MLflow logs `flatten(asdict(cfg))`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from mammodp.errors import ConfigError

INF = math.inf


@dataclass(frozen=True)
class PhantomConfig:
    """The built-in synthetic data set (`mammodp phantom`)."""

    seed: int = 0  # drives every random draw; same seed -> byte-identical files
    cbis_train_patients: int = 120  # patients in the CBIS-layout training CSV
    cbis_test_patients: int = 40  # patients in the CBIS-layout test CSV
    bcdr_patients: int = 60  # patients in the BCDR-layout external set
    image_height: int = 512  # px, full-field CBIS-style mammogram
    image_width: int = 320  # px
    bcdr_scale: float = 0.75  # BCDR images are acquired at this fraction of CBIS resolution
    mass_radius: tuple[float, float] = (10.0, 26.0)  # px, range of mass radii (CBIS scale)
    difficulty: float = 0.5  # 0 = trivially separable shapes, 1 = indistinguishable


@dataclass(frozen=True)
class DataConfig:
    """Where data lives (paths relative to the repo root)."""

    raw_dir: str = "data/raw"  # versioned by data.dvc (`dvc add data/raw`)
    cbis_dir: str = "data/raw/cbis-ddsm"  # case-description CSVs + DICOM tree below it
    bcdr_dir: str = "data/raw/bcdr"  # BCDR-*_dataset folders with outlines CSVs
    prepared_dir: str = "data/prepared"  # prepared/{cbis,bcdr}/manifest.parquet + patches
    synthetic_dir: str = "data/synthetic"  # synthetic PNGs + manifest.parquet


@dataclass(frozen=True)
class PrepareConfig:
    """Patch extraction and splits (`mammodp prepare`)."""

    patch_size: int = 64  # px, side of the stored square patch
    margin: int = 60  # px (source resolution) added on every side of a lesion's bbox
    min_size: int = 128  # px (source resolution), smallest square crop side
    val_fraction: float = 0.15  # fraction of CBIS-train patients held out for validation
    stratify: str = "breast_density"  # manifest column the val split is stratified on
    on_error: Literal["fail", "skip"] = "fail"  # skip: bad files are listed in a report
    workers: int = 2  # processes decoding files in parallel; also rendering the phantom (same bytes for any number)
    seed: int = 0  # split seed


@dataclass(frozen=True)
class ValidateConfig:
    """Bounds for the Great Expectations suite (`mammodp validate`)."""

    min_class_fraction: float = 0.2  # each class is at least this fraction of every split
    intensity_mean: tuple[float, float] = (0.05, 0.95)  # bounds on a patch's mean in [0, 1]
    intensity_std_min: float = 0.01  # a patch with less spread is blank or broken


@dataclass(frozen=True)
class ModelConfig:
    """Classifier architecture."""

    preset: str = "swin_micro"  # a key of mammodp.models.swin.PRESETS
    # local weights file (.pth/.safetensors), or a hub model `hf-hub:timm/<name>` resolved through
    # the Hugging Face cache (HF_HUB_OFFLINE=1: cache only); null = random init
    pretrained_weights: str | None = None
    mode: Literal["full", "frozen_backbone"] = "full"  # what is trained (and privatised)


@dataclass(frozen=True)
class PretrainConfig:
    """Public in-domain pretraining (`mammodp phantom --public`, `mammodp pretrain`).

    The paper starts from ImageNet weights; the demo has none, but it can have a PUBLIC
    mammography set: a second phantom (own seed, patient numbers offset so that no patient is
    shared with any private or test split) on which the Swin is trained without DP. Its
    weights (`models/pretrain/model.pt`) are then `model.pretrained_weights`, exactly as
    ImageNet weights are in the paper plan. No private record is read, so no epsilon is spent.
    """

    enabled: bool = True  # false: the stage writes no weights (set model.pretrained_weights yourself)
    seed: int = 1  # the public phantom's seed (the private phantom uses phantom.seed)
    train_patients: int = 300  # public CBIS-style patients trained on (prepare splits off val)
    test_patients: int = 60  # public held-out patients (reported, never selected on)
    patient_offset: int = 50000  # public patient numbers start here (P_5xxxx): disjoint namespace
    epochs: int = 20
    lr: float = 1.0e-3  # AdamW, cosine decay after warm-up
    warmup_epochs: int = 2  # linear learning-rate warm-up
    batch_size: int = 32


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings shared by every private run."""

    delta: float = 1e-4  # target delta of (epsilon, delta)-DP
    max_grad_norm: float = 1.0  # clipping norm C, per privacy unit
    accountant: Literal["prv", "rdp"] = "prv"  # PRV falls back to RDP if it fails
    privacy_unit: Literal["patch", "patient"] = "patch"  # what one record is
    reproducible_noise: bool = False  # seed the noise generator (breaks the DP guarantee)
    grad_chunk: int = 32  # samples per per-sample-gradient chunk (bounds their memory)
    per_sample_method: Literal["auto", "vmap", "hooks", "mixed", "ghost"] = "auto"  # auto: mixed, checked vs vmap


# The one cell (folder, metrics and report name) of the budget-independent `synth` regime.
SYNTH_CELL = "synth"


@dataclass(frozen=True)
class TrainConfig:
    """Classifier training grid and loop (`mammodp train`)."""

    # Regimes that use synthetic data AND real records, one cell per budget (DVC stage `train`);
    # `real` is always trained (`train_real`), so that a change to the GAN reruns only the
    # synthetic pathway. `synth` is not listed here: it touches no private record, so it is
    # trained once (stage `train_synth`) and reported at every budget (`synth_regime`).
    synthetic_regimes: tuple[str, ...] = ("real+synth", "synth-pretrain+dp-finetune")
    # Report the `synth` regime (synthetic patches only). Its model is trained once, whatever the
    # budgets, and is also the synthetic pretraining that every synth-pretrain+dp-finetune cell
    # fine-tunes; so stage `train_synth` runs even when this is false (then it is not reported).
    synth_regime: bool = True
    epsilons: tuple[float, ...] = (1.0, 6.0, INF)  # target budgets; inf = non-private
    seeds: tuple[int, ...] = (0,)
    epochs: int = 8
    # Epochs on synthetic patches only: the `synth` model, which is the shared synthetic
    # pretraining of synth-pretrain+dp-finetune (its best validation epoch is what is fine-tuned).
    pretrain_epochs: int = 4
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-8
    batch_size: int = 64  # logical batch: expected size under Poisson sampling
    physical_batch_size: int = 64  # largest batch pushed through the model at once
    label_smoothing: float = 0.1
    flip: bool = True  # random horizontal/vertical flips (training only)
    synth_ratio: float = 1.0  # synthetic samples per real sample in real+synth
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    num_workers: int = 0  # DataLoader workers

    @property
    def regimes(self) -> tuple[str, ...]:
        """Every reported regime: `real`, `synth` (when `synth_regime`) and the per-budget synthetic ones."""
        return ("real",) + (("synth",) if self.synth_regime else ()) + tuple(self.synthetic_regimes)


@dataclass(frozen=True)
class BaselineConfig:
    """The classical baseline regime `radiomics-linear` (`mammodp features`, `mammodp train-baseline`).

    A logistic regression on pyradiomics features of each patch, trained for every budget of
    `train.epsilons` (inf: scikit-learn; finite: DP-SGD through `make_private` with the `dp.*`
    settings of the Swin runs). Features are standardised with statistics of PUBLIC data only.
    """

    # pyradiomics feature classes, computed inside a lesion mask segmented from the patch
    # (Otsu threshold, component at the centre): first-order, texture (glcm, glrlm, glszm, gldm,
    # ngtdm) and 2-D shape (shape2D) of that mask
    features: tuple[str, ...] = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm", "shape2D")
    bin_count: int = 32  # grey levels of the texture matrices (fixed count: robust at small patches)
    # where the standardisation statistics come from: a PUBLIC set only (see mammodp.baseline.
    # PUBLIC_SOURCES); private training/validation patches and synthetic data from a generator
    # trained on them are refused
    scaler_source: str = "public"
    public_patches: int = 256  # public patches (a fixed seeded draw) whose features fit the scaler; 0 = all
    C: float = 1.0  # inverse L2 strength of the non-private scikit-learn logistic regression
    lr: float = 0.5  # DP-SGD learning rate (AdamW) of the private linear model
    weight_decay: float = 1e-3  # AdamW weight decay of the private linear model
    epochs: int = 30  # DP-SGD epochs (calibrates the noise with batch_size)
    batch_size: int = 64  # expected records per Poisson batch of the private linear model
    workers: int = 2  # processes extracting features (per-patch work: the result does not depend on it)


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation, CIs and fairness (`mammodp evaluate`)."""

    bootstrap: int = 200  # bootstrap resamples for 95% CIs
    ci: float = 0.95
    age_bins: tuple[float, ...] = (0, 30, 60, 70, 80, 100)  # Study B's bins, [lo, hi)
    subgroups: tuple[str, ...] = ("age_bin", "breast_density", "view")
    threshold: Literal["youden", "fixed"] = "youden"  # operating point, chosen on val only
    fixed_threshold: float = 0.5


@dataclass(frozen=True)
class GanDPConfig:
    """DP-SGD on the MCGAN discriminator (the generator is post-processing)."""

    enabled: bool = False
    epsilon: float = 10.0
    delta: float = 1e-4
    max_grad_norm: float = 1.0
    accountant: Literal["prv", "rdp"] = "rdp"  # PRV falls back to RDP if it fails
    reproducible_noise: bool = False  # seed the DP noise from `seed` (breaks the DP guarantee)
    # Public in-domain data (the `public_data` stage's folder; null = none) for two uses under DP:
    # - warm start: `public_epochs` non-private epochs on it (all its splits: every one is public)
    #   before the DP epochs on the private patches. From scratch at demo size (947 patches,
    #   eps 10) DP-SGD's noise swamps the discriminator and the generator collapses to one
    #   texture (FRD real-synth 2273 against 58 without DP, 2026-12-02);
    # - the mode-collapse yardstick (diversity of public patches), which under DP cannot come
    #   from the private ones. 0 epochs = yardstick only.
    public_data: str | None = None
    public_epochs: int = 0
    # The DP discriminator's optimiser. Under DP-SGD its gradient is mostly noise per coordinate
    # at demo size (noise std sigma*C/B = 0.023 per coordinate against ~0.002 of clipped signal);
    # Adam divides each coordinate by its own running RMS, so every weight moves ~lr per step
    # whatever the signal and the discriminator random-walks: the generator collapsed (FRD
    # real-synth 2053 with the public warm start; Adam at lr 5e-5 too: 2061). Plain SGD keeps the
    # noise zero-mean in the update so the signal accumulates over steps (`sgd`, lr 1.0,
    # momentum 0.5: FRD 220, no collapse; 2026-12-03). `adam` uses gan.lr and gan.dp.betas.
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 1.0  # SGD learning rate of the DP discriminator (on the clipped, noised mean gradient)
    momentum: float = 0.5  # SGD momentum of the DP discriminator
    # Adam's betas in a DP run, in place of gan.betas: the generator's (warm start included) and,
    # with `optimizer: adam`, the discriminator's. The generator learns from the private
    # discriminator's noisy weights: without first-moment momentum (gan.betas [0.0, 0.99], the
    # demo's non-private setting) it failed (demo, eps 10, one run each, 2026-12-04: FRD
    # real-synth 1847 over 30 subsets, diversity 0.68 of the public set's); with the paper's
    # (0.5, 0.999): FRD 720, diversity 1.04.
    betas: tuple[float, float] = (0.5, 0.999)


@dataclass(frozen=True)
class GanConfig:
    """Malignancy-conditioned DCGAN (`mammodp train-gan`)."""

    image_size: Literal[64, 128] = 64
    latent_dim: int = 100
    width: int = 64  # channels of the narrowest generator layer (64 = paper: 1024 -> ... -> 64)
    # generator x2 upsampling: resize_conv (nearest + 3x3 conv, no checkerboard artefacts) or
    # transposed (the paper's stride-2 ConvTranspose)
    upsample: Literal["resize_conv", "transposed"] = "resize_conv"
    # A stride-1 3x3 conv at full resolution at the head of the discriminator, so that it sees
    # pixel-scale texture (the paper's first layer is a stride-2 6x6 conv); see mcgan.GanSpec.d_stem.
    d_stem: bool = False
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-4
    # Adam's (beta1, beta2) for both networks of a NON-private run (a DP run uses gan.dp.betas).
    # The paper's DCGAN: (0.5, 0.999). The demo: (0.0, 0.99), no momentum on the first moment
    # (as in many later GANs; our reading, not tested apart: at 600 steps the generator then
    # follows the discriminator's current gradient, not a stale average). Demo FRD real-synth,
    # 30 subsets of 64, seeds 0-3: 42 / 51 / 38 / 37 against 55 / 69 / 82 / - at (0.5, 0.999)
    # (internal-external 54); README, "What the demo shows".
    betas: tuple[float, float] = (0.5, 0.999)
    real_label_range: tuple[float, float] = (0.7, 1.2)  # one-sided label smoothing
    checkpoint_every: int = 5  # epochs
    sample_every: int = 5  # epochs between sample grids logged to MLflow
    device: str = "auto"
    amp: bool = False
    cpu_threads: int = 0  # torch intra-op threads when training on CPU; 0 = torch's default
    collapse_threshold: float = 0.1  # mode collapse: sample diversity < this x real diversity
    diverge_loss: float = 20.0  # nats; an epoch-mean loss above this (or non-finite) = diverging
    # Save (and show) an exponential moving average of the generator's weights, updated after
    # every step with this decay (0 = the last iterate, as the paper). The average over the last
    # ~1 / (1 - decay) steps is a better generator than the last one: single iterates oscillate
    # around what the discriminator currently rewards (`mcgan.GeneratorEMA`). The demo's 0.99
    # averages ~100 steps, a sixth of its 600 (with feature matching, seeds 0 / 1 / 2: FRD
    # real-synth 60.0 / 59.7 / 63.0 at 0.99 against 62.3 / 62.0 / 66.6 at 0.995).
    ema_decay: float = 0.0
    # Non-private runs: the public set of `gan.dp.public_data` (all its splits; patients disjoint
    # from every private and test split) joins the real training patches. A DP run uses the
    # public set as its warm start instead (`gan.dp.public_epochs`) and ignores this.
    train_on_public: bool = False
    # Non-private runs: weight of a feature-matching term in the generator's loss (0 = off, the
    # paper's loss): the squared distance between the per-channel means and standard deviations
    # of the discriminator's first stride-2 features (local texture detectors) on the fakes and
    # on the real batch of the same step (`mcgan.feature_matching_loss`). It pulls the
    # generator's pixel-scale texture toward the data's, which the adversarial term alone
    # constrains loosely at demo size (demo, stem + average 0.995, seeds 0 / 1 / 2: FRD
    # real-synth 72 / 64 / 91 without, 62.3 / 62.0 / 66.6 with 3.0, 3 subsets). With Adam betas
    # (0.0, 0.99) it no longer helps (30 subsets, seeds 0-3: 42 / 51 / 38 / 37 without, 50 / 51 /
    # 46 / 38 at 3.0, 45 / 48 / 48 / 41 at 10): off in the demo since 2026-12-04 (night). A DP
    # run ignores it: its generator step must not read private patches (it is post-processing
    # of the private discriminator).
    feature_matching: float = 0.0
    dp: GanDPConfig = field(default_factory=GanDPConfig)


@dataclass(frozen=True)
class SynthesizeConfig:
    """Synthetic set written by `mammodp synthesize`."""

    n_per_class: int = 100
    seed: int = 0


@dataclass(frozen=True)
class SynthQualityConfig:
    """FID / FRD / memorisation (`mammodp synth-quality`)."""

    # K random subsets; each figure is the mean over them, with its std and standard error
    # (std / sqrt(K)). With few images per side one subset's FRD is noisy (demo, 64 per side:
    # std ~12, so K = 3 cannot order rows that differ by less than ~15; K = 30: SE ~2).
    subsets: int = 3
    subset_size: int = 64  # images per side of each comparison
    inception_weights: str | None = None  # local Inception weights; null = skip FID
    frd_version: Literal["v0", "v1"] = "v0"  # frd-score feature set (v0 = the paper's table)
    memorisation_size: int = 32  # px, side images are downsampled to for nearest neighbours
    memorisation_percentile: float = 1.0  # percentile of the held-out baseline = threshold
    closest_pairs: int = 8  # synthetic/training pairs shown in the closest-pairs grid
    # Show the real training patches in the closest-pairs grid (MLflow + dvc plots): a release of
    # private data without DP; false withholds them (the synthetic row and distances stay).
    show_real_pairs: bool = False
    workers: int = 2  # processes extracting radiomics features (the figures do not depend on it)
    seed: int = 0


@dataclass(frozen=True)
class TuneConfig:
    """Optuna study per privacy budget (`mammodp tune`)."""

    epsilons: tuple[float, ...] = (1.0, 6.0)  # one study per finite budget
    n_trials: int = 4  # trials ADDED to the budget's study by each `mammodp tune`
    storage: str = "sqlite:///optuna.db"  # any SQLAlchemy URL; shared by workers
    data: Literal["real", "synthetic"] = "real"  # which validation data scores trials
    synthetic_val_size: int = 200  # synthetic patches (label-balanced) scoring trials; 0 = all
    max_grad_norm: tuple[float, float] = (0.1, 5.0)  # clipping norm C, log-uniform range
    noise_multiplier: tuple[float, float] = (0.5, 5.0)  # sigma, log-uniform (raised to what 1 epoch needs)
    lr: tuple[float, float] = (1e-4, 1e-2)  # AdamW learning rate, log-uniform range
    max_epochs: int = 8  # cap on epochs when the accountant would allow more
    startup_trials: int = 4  # random trials before TPE models the space
    pruner_startup_trials: int = 2  # MedianPruner: complete trials before pruning starts
    pruner_warmup_epochs: int = 1  # MedianPruner: epochs a trial runs before it may be pruned


@dataclass(frozen=True)
class ServeConfig:
    """Limits of the served model (`mlflow models serve`), saved in its meta.json at training time."""

    max_image_pixels: int = 40_000_000  # rows x columns (x frames) of one image or `pixels` patch
    max_roi_side: int = 4096  # px, the larger side of a request's `roi` box
    max_rows: int = 64  # patches per request


@dataclass(frozen=True)
class PromoteConfig:
    """MLflow registry promotion (`mammodp promote`)."""

    model_name: str = "mammodp-classifier"
    max_epsilon: float = 6.0  # champion = best validation AUPRC with epsilon <= this


@dataclass(frozen=True)
class AuditConfig:
    """Empirical privacy audit (`mammodp audit`): membership inference, one-run epsilon bound."""

    epsilons: tuple[float, ...] = (6.0,)  # finite budgets audited with canary models (+ the inf power model)
    models: int = 3  # audit models per budget: 1 canary target + (models - 1) LiRA shadows
    epochs: int = 15  # training epochs of each audit model
    real_records: int = 128  # real CBIS train+test patches an audit model may train on (each in w.p. 1/2)
    canaries: int = 64  # canaries of EACH kind per model: white-box (gradient) and black-box (noise patches)
    significance: float = 0.05  # 1 - confidence of the empirical lower bound (split over the two kinds)
    fprs: tuple[float, ...] = (0.001, 0.01)  # false-positive rates at which membership TPR is reported
    min_power_epsilon: float = 0.5  # the non-private power model's bound must exceed this (else: no power)
    # Accountant of the audit models' claims: rdp_int = RDP at integer orders (fast; a valid,
    # slightly looser upper bound), rdp, or prv.
    accountant: Literal["rdp_int", "rdp", "prv"] = "rdp_int"
    cpu_threads: int = 1  # torch intra-op threads on CPU (small models: more threads mostly wait); 0 = default
    seed: int = 0  # canaries, inclusion coins, real-set draw


@dataclass(frozen=True)
class Config:
    """The whole params.yaml."""

    plan: str = "demo"  # name of the experiment plan these params came from
    seed: int = 0  # python / numpy / torch seed
    experiment: str = "mammodp"  # MLflow experiment name
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    synth_quality: SynthQualityConfig = field(default_factory=SynthQualityConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type hint `tp` and convert lists to tuples; raise naming `key`."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {type(value).__name__}", field=key)
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{value!r} matches none of {tp}", field=key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{value!r} is not one of {list(get_args(tp))}", field=key)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", field=key)
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"expected {len(args)} values, got {len(value)}", field=key)
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true/false, got {value!r}", field=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", field=key)
        return value
    if tp is float:
        if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", ".inf", "infinity"):
            return INF
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            value = float(value.strip())
            if math.isinf(value):
                raise ConfigError("overflows to infinity; write inf if infinity is meant", field=key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}", field=key)
        if math.isnan(value):
            raise ConfigError("NaN is not a valid value", field=key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", field=key)
        return value
    raise ConfigError(f"unsupported config type {tp}", field=key)  # a bug in this module


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key; known keys here: {', '.join(sorted(names))}",
            field=where + unknown[0],
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in raw:
            # Strict: a plan states every setting. A silent code default once trained 8 epochs
            # where the plan said 30 (the defaults below document, they do not fill in).
            raise ConfigError("missing key: every setting must be stated in the params file "
                              "(see pipelines/*.yaml for complete plans)", field=key)
        kwargs[f.name] = _coerce(raw[f.name], hints[f.name], key)
    obj = cls(**kwargs)
    _check(obj, prefix)
    return obj


_SEED_MAX = 2**32 - 1  # numpy's limit; torch takes more
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
_INF_WORDS = ("inf", "+inf", ".inf", "+.inf", "infinity", "+infinity")  # budgets on the command line


def _check(obj: Any, prefix: str) -> None:
    """Range checks that types alone cannot express: every field of every section, by its name."""

    def bad(name: str, msg: str) -> None:
        raise ConfigError(msg, field=f"{prefix}.{name}" if prefix else name)

    def at_least(lowest: int | float, *names: str) -> None:
        for name in names:
            if not getattr(obj, name) >= lowest:
                bad(name, f"must be >= {lowest}, got {getattr(obj, name)}")

    def within(name: str, lo: float, hi: float, *, closed: str = "[]") -> None:
        v = getattr(obj, name)
        ok = (v >= lo if closed[0] == "[" else v > lo) and (v <= hi if closed[1] == "]" else v < hi)
        if not ok:
            bad(name, f"must be in {closed[0]}{lo:g}, {hi:g}{closed[1]}, got {v}")

    def seed(*names: str) -> None:
        for name in names:
            if not 0 <= getattr(obj, name) <= _SEED_MAX:
                bad(name, f"a seed must be in [0, {_SEED_MAX}], got {getattr(obj, name)}")

    def text(*names: str) -> None:
        for name in names:
            if not str(getattr(obj, name)).strip():
                bad(name, "must not be empty")

    def finite(*names: str) -> None:
        for name in names:
            values = getattr(obj, name)
            for v in values if isinstance(values, tuple) else (values,):
                if isinstance(v, float) and math.isinf(v):
                    bad(name, f"must be finite, got {v}")

    def adam_betas(name: str) -> None:
        b1, b2 = getattr(obj, name)
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            bad(name, f"Adam betas must each be in [0, 1), got [{b1}, {b2}]")

    def log_range(name: str) -> None:
        lo, hi = getattr(obj, name)
        if not 0 < lo <= hi < INF:
            bad(name, f"range must satisfy 0 < low <= high < inf, got [{lo}, {hi}]")

    if isinstance(obj, Config):
        seed("seed")
        text("plan", "experiment")
        # The private phantom numbers its patients below 3 x patients + 20 (data/phantom.py).
        top = 3 * (obj.phantom.cbis_train_patients + obj.phantom.cbis_test_patients) + 20
        if obj.pretrain.enabled and obj.pretrain.patient_offset < top:
            raise ConfigError(f"must be >= {top} so that public patients are disjoint from the phantom's "
                              f"(phantom patient numbers go up to {top - 1}), got {obj.pretrain.patient_offset}",
                              field="pretrain.patient_offset")
    if isinstance(obj, PhantomConfig):
        seed("seed")
        at_least(2, "cbis_train_patients")
        at_least(1, "cbis_test_patients", "bcdr_patients")
        at_least(64, "image_height", "image_width")
        finite("bcdr_scale", "mass_radius")
        within("bcdr_scale", 0, 4, closed="(]")
        lo, hi = obj.mass_radius
        if not 0 < lo <= hi:
            bad("mass_radius", f"range must satisfy 0 < low <= high, got [{lo}, {hi}]")
        within("difficulty", 0, 1)
    if isinstance(obj, DataConfig):
        text("raw_dir", "cbis_dir", "bcdr_dir", "prepared_dir", "synthetic_dir")
    if isinstance(obj, PrepareConfig):
        at_least(16, "patch_size")
        at_least(0, "margin")
        at_least(1, "min_size", "workers")
        within("val_fraction", 0, 1, closed="()")
        text("stratify")
        seed("seed")
    if isinstance(obj, ValidateConfig):
        within("min_class_fraction", 0, 0.5, closed="[)")
        lo, hi = obj.intensity_mean
        if not 0 <= lo < hi <= 1:
            bad("intensity_mean", f"must be [low, high] with 0 <= low < high <= 1, got [{lo}, {hi}]")
        within("intensity_std_min", 0, 1)
    if isinstance(obj, ModelConfig):
        text("preset")
        if obj.pretrained_weights is not None:
            text("pretrained_weights")
    if isinstance(obj, PretrainConfig):
        seed("seed")
        at_least(2, "train_patients")
        at_least(1, "test_patients", "epochs", "batch_size")
        at_least(0, "patient_offset", "warmup_epochs")
        finite("lr")
        if not obj.lr > 0:
            bad("lr", f"must be > 0, got {obj.lr}")
    if isinstance(obj, DPConfig):
        within("delta", 0, 1, closed="()")
        finite("max_grad_norm")
        if not obj.max_grad_norm > 0:
            bad("max_grad_norm", f"must be > 0, got {obj.max_grad_norm}")
        at_least(1, "grad_chunk")
    if isinstance(obj, TrainConfig):
        known = {"real+synth", "synth-pretrain+dp-finetune"}
        for r in obj.synthetic_regimes:
            if r == "synth":
                bad("synthetic_regimes", "'synth' touches no private record: it is trained once (stage "
                    "train_synth) and reported at every budget; remove it here (train.synth_regime switches it)")
            if r not in known:
                bad("synthetic_regimes", f"unknown regime {r!r}; known: {sorted(known)} (real is always trained)")
        if len(set(obj.synthetic_regimes)) != len(obj.synthetic_regimes):
            bad("synthetic_regimes", "lists a regime twice")
        if not obj.epsilons:
            bad("epsilons", "needs at least one budget (inf = non-private)")
        for e in obj.epsilons:
            if not e > 0:
                bad("epsilons", f"a budget must be > 0 (inf = non-private), got {e}")
        if len(set(obj.epsilons)) != len(obj.epsilons):
            bad("epsilons", "lists a budget twice")
        if not obj.seeds:
            bad("seeds", "needs at least one seed")
        if len(set(obj.seeds)) != len(obj.seeds):
            bad("seeds", "lists a seed twice")
        for s in obj.seeds:
            if not 0 <= s <= _SEED_MAX:
                bad("seeds", f"a seed must be in [0, {_SEED_MAX}], got {s}")
        at_least(1, "epochs", "pretrain_epochs", "batch_size", "physical_batch_size")
        at_least(0, "num_workers")
        finite("lr", "weight_decay", "synth_ratio")
        if not obj.lr > 0:
            bad("lr", f"must be > 0, got {obj.lr}")
        at_least(0, "weight_decay", "synth_ratio")
        within("label_smoothing", 0, 1, closed="[)")
        if not _DEVICE.match(obj.device):
            bad("device", f"must be auto, cpu, cuda, cuda:N or mps, got {obj.device!r}")
    if isinstance(obj, BaselineConfig):
        known_classes = {"firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm", "shape2D"}
        if not obj.features or any(c not in known_classes for c in obj.features):
            bad("features", f"must name pyradiomics classes among {sorted(known_classes)}, got {list(obj.features)}")
        if len(set(obj.features)) != len(obj.features):
            bad("features", "lists a class twice")
        at_least(2, "bin_count")
        at_least(1, "epochs", "batch_size", "workers")
        at_least(0, "public_patches")
        text("scaler_source")
        finite("C", "lr", "weight_decay")
        for name in ("C", "lr"):
            if not getattr(obj, name) > 0:
                bad(name, f"must be > 0, got {getattr(obj, name)}")
        at_least(0, "weight_decay")
    if isinstance(obj, EvaluateConfig):
        at_least(0, "bootstrap")
        within("ci", 0, 1, closed="()")
        bins = obj.age_bins
        finite("age_bins")
        if len(bins) < 2 or any(nxt <= prev for prev, nxt in zip(bins[:-1], bins[1:])):
            bad("age_bins", f"must be at least 2 strictly increasing edges, got {list(bins)}")
        if not obj.subgroups or any(not g.strip() for g in obj.subgroups):
            bad("subgroups", "must name at least one column, none empty")
        within("fixed_threshold", 0, 1)
    if isinstance(obj, GanConfig):
        at_least(1, "width", "latent_dim", "epochs", "batch_size", "checkpoint_every", "sample_every")
        at_least(0, "cpu_threads")
        finite("lr", "collapse_threshold", "diverge_loss")
        if not obj.lr > 0:
            bad("lr", f"must be > 0, got {obj.lr}")
        adam_betas("betas")
        lo, hi = obj.real_label_range
        if not 0 < lo <= hi < INF:
            bad("real_label_range", f"range must satisfy 0 < low <= high, got [{lo}, {hi}]")
        at_least(0, "collapse_threshold")
        within("ema_decay", 0, 1, closed="[)")
        finite("feature_matching")
        at_least(0, "feature_matching")
        if not obj.diverge_loss > 0:
            bad("diverge_loss", f"must be > 0, got {obj.diverge_loss}")
        if not _DEVICE.match(obj.device):
            bad("device", f"must be auto, cpu, cuda, cuda:N or mps, got {obj.device!r}")
        if obj.train_on_public and not obj.dp.public_data:
            bad("train_on_public", "needs gan.dp.public_data (the public set's folder)")
    if isinstance(obj, GanDPConfig):
        finite("epsilon", "max_grad_norm")
        if not obj.epsilon > 0:
            bad("epsilon", f"must be > 0, got {obj.epsilon}")
        within("delta", 0, 1, closed="()")
        if not obj.max_grad_norm > 0:
            bad("max_grad_norm", f"must be > 0, got {obj.max_grad_norm}")
        at_least(0, "public_epochs")
        finite("lr", "momentum")
        if not obj.lr > 0:
            bad("lr", f"must be > 0, got {obj.lr}")
        within("momentum", 0, 1, closed="[)")
        adam_betas("betas")
        if obj.public_epochs > 0 and not obj.public_data:
            bad("public_epochs", "a public warm start needs gan.dp.public_data (the public set's folder)")
    if isinstance(obj, SynthesizeConfig):
        at_least(1, "n_per_class")
        seed("seed")
    if isinstance(obj, SynthQualityConfig):
        at_least(1, "subsets", "closest_pairs", "workers")
        if obj.subset_size < 2:
            bad("subset_size", "must be >= 2 (a covariance needs two images)")
        at_least(4, "memorisation_size")
        within("memorisation_percentile", 0, 100, closed="()")
        if obj.inception_weights is not None:
            text("inception_weights")
        seed("seed")
    if isinstance(obj, AuditConfig):
        for e in obj.epsilons:
            if not (0 < e < INF):
                bad("epsilons", f"audited budgets must be finite and > 0 (the inf power model is always run), got {e}")
        at_least(1, "models", "epochs")
        at_least(2, "canaries", "real_records")
        within("significance", 0, 1, closed="()")
        at_least(0, "cpu_threads")
        for f in obj.fprs:
            if not 0 < f < 1:
                bad("fprs", f"false-positive rates must be in (0, 1), got {f}")
    if isinstance(obj, TuneConfig):
        for name in ("max_grad_norm", "noise_multiplier", "lr"):
            log_range(name)
        if not obj.epsilons:
            bad("epsilons", "needs at least one finite budget")
        for e in obj.epsilons:
            if not (0 < e < INF):
                bad("epsilons", f"tuning needs finite budgets > 0 (noise is what it tunes), got {e}")
        at_least(1, "n_trials", "max_epochs")
        at_least(0, "synthetic_val_size", "startup_trials", "pruner_startup_trials", "pruner_warmup_epochs")
        text("storage")
    if isinstance(obj, PromoteConfig):
        text("model_name")
        if not obj.max_epsilon > 0:
            bad("max_epsilon", f"must be > 0 (inf = any budget), got {obj.max_epsilon}")
    if isinstance(obj, ServeConfig):
        at_least(1, "max_image_pixels", "max_roi_side", "max_rows")


_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_INF_TEXT = {".inf", "+.inf", "-.inf", ".Inf", "+.Inf", "-.Inf", ".INF", "+.INF", "-.INF"}


class _ParamsLoader(yaml.SafeLoader):
    """YAML as a person reads it: `1e-3` is a number (PyYAML's YAML 1.1 rules make it a
    string), and an overflowing literal such as `1e400` is an error rather than infinity
    (only a literal `inf` / `.inf` means infinity: a non-private budget is never an accident)."""


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node)
    if text in _INF_TEXT:
        return -INF if text.startswith("-") else INF
    if text.lower() in (".nan",):
        return math.nan
    value = float(text.replace("_", ""))
    if math.isinf(value):
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} overflows to infinity; write inf if infinity is meant", node.start_mark)
    return value


_ParamsLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
# Scientific notation without a dot (1e-3, 5E+2) resolves to float too.
_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?\d+[eE][-+]?\d+$"), list("-+0123456789"))


def read_params(path: str | Path) -> dict:
    """Parse a params file with the project's YAML rules (see `_ParamsLoader`).

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError("params file not found", path=p)
    try:
        raw = yaml.load(p.read_text(), Loader=_ParamsLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"not valid YAML{where}: {problem}", path=p) from exc
    if raw is None:
        raise ConfigError("params file is empty", path=p)
    if not isinstance(raw, dict):
        raise ConfigError("top level must be a mapping", path=p)
    return raw


def load_config(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate params.yaml.

    Args:
        path: the YAML file.
        overrides: optional dotted-key overrides (`{"train.lr": 0.01}`), applied before checks.

    Raises:
        ConfigError: the file is missing or unreadable, or a key is unknown or ill-typed.
    """
    p = Path(path)
    raw = read_params(p)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return _build(Config, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {p})") from exc


def check_params_files(paths: list[str | Path]) -> list[str]:
    """Load each params file strictly; return one line per file (`ok` or the error).

    Used by `make lint-params` over params.yaml and every plan in pipelines/.
    """
    lines = []
    for p in paths:
        try:
            load_config(p)
            lines.append(f"ok     {p}")
        except ConfigError as exc:
            lines.append(f"error  {exc}")
    return lines


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config dataclass (or dict) to dotted keys, e.g. for `mlflow.log_params`."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def format_epsilon(eps: float) -> str:
    """Canonical text of a budget in names and tags: `1`, `6`, `0.5`, `inf`."""
    if math.isinf(eps):
        return "inf"
    return f"{eps:g}"


def parse_epsilon(text: str | float) -> float:
    """Inverse of `format_epsilon`; accepts numbers too.

    Only the literal `inf` (or `infinity`) means non-private: a number too large for a float
    (`1e400`) is refused, not silently read as infinity.
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = text.strip().lower()
        if t in _INF_WORDS:
            return INF
        try:
            value = float(t)
        except ValueError as exc:
            raise ConfigError(f"not a privacy budget: {text!r}", field="epsilon") from exc
        if math.isinf(value):
            raise ConfigError(f"{text!r} is too large for a number; write inf for a non-private run",
                              field="epsilon")
    if math.isnan(value) or not value > 0:
        raise ConfigError(f"a budget must be > 0, got {text!r}", field="epsilon")
    return value


__all__ = [n for n in dir() if n.endswith("Config")] + [
    "load_config",
    "read_params",
    "check_params_files",
    "flatten",
    "format_epsilon",
    "parse_epsilon",
    "INF",
]
