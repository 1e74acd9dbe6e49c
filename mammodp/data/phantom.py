"""The built-in phantom: synthetic mammograms in the on-disk formats of CBIS-DDSM and BCDR.

The phantom lets the whole pipeline run (and be tested) without the real data sets, which
need registration to download. It is written so that the real importers read it exactly as
they read real data, quirks included:

* CBIS-DDSM (`ROOT/cbis-ddsm/`): the two mass case-description CSVs with the real columns,
  path cells that name `000000.dcm` / `000001.dcm` and end with a newline, and a DICOM tree
  laid out the way a TCIA download lays it out (`CBIS-DDSM/<folder>/<date>-DDSM-<n>/
  1.000000-<series description>-<n>/1-1.dcm`). Files are matched to CSV rows only through
  their StudyInstanceUID / SeriesInstanceUID tags. The ROI series holds the mask and the
  cropped image in either order (sometimes the crop has its own series); a few masks are a
  few pixels off their image's size; a few mammograms are MONOCHROME1; some images carry
  two abnormalities; some patients have both views.
* BCDR (`ROOT/bcdr/`): two subset folders with `bcdr_<subset>_outlines.csv` (leading
  spaces in file names and point lists, ` N/A` densities, `Benign` / `Malign` in varying
  case and whitespace, a few non-mass rows) and 8-bit PNG images acquired in a different
  style (resolution, contrast curve, noise, texture), so external testing sees a real
  domain shift.

The signal is real but not trivial: benign masses are round or oval with sharp margins,
malignant ones irregular, spiculated and with blurred margins, drawn from a latent
irregularity whose class-conditional distributions overlap more as `difficulty` grows
(0: nearly separable, 1: identical). Breast tissue is 1/f^beta noise whose dense fraction
follows the breast-density category.

Everything derives from one seed through `numpy.random.SeedSequence` keys (split, patient),
and nothing on disk holds a timestamp, so the same seed gives a byte-identical tree.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from scipy import ndimage

from mammodp.config import PhantomConfig
from mammodp.errors import ConfigError, DataError

# --------------------------------------------------------------------------- constants

CBIS_COLUMNS = (
    "patient_id",
    "breast_density",
    "left or right breast",
    "image view",
    "abnormality id",
    "abnormality type",
    "mass shape",
    "mass margins",
    "assessment",
    "pathology",
    "subtlety",
    "image file path",
    "cropped image file path",
    "ROI mask file path",
)
BCDR_COLUMNS = (
    "patient_id",
    "study_id",
    "series",
    "lesion_id",
    "segmentation_id",
    "image_view",
    "image_filename",
    "lw_x_points",
    "lw_y_points",
    "mammography_type",
    "mammography_nodule",
    "mammography_calcification",
    "mammography_microcalcification",
    "mammography_axillary_adenopathy",
    "mammography_architectural_distortion",
    "mammography_stroma_distortion",
    "age",
    "density",
    "classification",
)
# BCDR image_view codes and the view names BCDR puts in its file names.
BCDR_VIEW_CODE = {("RIGHT", "CC"): 1, ("LEFT", "CC"): 2, ("RIGHT", "MLO"): 3, ("LEFT", "MLO"): 4}
BCDR_VIEW_NAME = {1: "RCC", 2: "LCC", 3: "RO", 4: "LO"}
BCDR_SUBSETS = ("D01", "F01")

UID_ROOT = "1.3.6.1.4.1.9590.100.1.2."  # the root CBIS-DDSM's own UIDs use
MALIGNANT_FRACTION_CBIS = 0.48  # released CBIS patches: 525 / 1104 + 157 / 402 malignant
MALIGNANT_FRACTION_BCDR = 0.44  # released BCDR patches: 486 / 1106 malignant
FULL_STUDY_DATE = ("20160720", "07-20-2016")  # (DICOM StudyDate, TCIA folder spelling)
ROI_STUDY_DATE = ("20160807", "08-07-2016")
# Fraction of the breast that is dense tissue per BI-RADS density category.
DENSE_FRACTION = {1: 0.12, 2: 0.30, 3: 0.52, 4: 0.75}
# Quirk rates (each present at least once per split so small sets exercise the importer).
TWO_LESION_RATE = 0.30  # patients with two masses in the imaged breast
BOTH_VIEWS_RATE = 0.25  # patients with CC and MLO images (else one view)
MONOCHROME1_RATE = 0.10
NO_RESCALE_RATE = 0.15
OFF_SIZE_MASK_RATE = 0.05
SEPARATE_CROP_SERIES_RATE = 0.25
BCDR_NA_DENSITY_RATE = 0.08
BCDR_NON_MASS_RATE = 0.10


@dataclass(frozen=True)
class AcquisitionStyle:
    """How a site's mammograms look: what makes CBIS and BCDR differ as domains.

    Attributes:
        texture_beta: exponent of the 1/f^beta tissue texture (higher = smoother).
        gamma: contrast curve applied to normalised intensity before quantisation.
        noise: standard deviation of the acquisition noise (fraction of full scale).
        blur: Gaussian blur sigma in px (film digitisation softens detail).
        lesion_gain: factor on lesion contrast.
        fat_level: intensity of fatty tissue (fraction of full scale).
        dense_level: extra intensity of dense (fibroglandular) tissue.
    """

    texture_beta: float
    gamma: float
    noise: float
    blur: float
    lesion_gain: float
    fat_level: float
    dense_level: float


CBIS_STYLE = AcquisitionStyle(
    texture_beta=3.0, gamma=1.0, noise=0.010, blur=0.0, lesion_gain=1.0, fat_level=0.30, dense_level=0.26
)
# BCDR differs from CBIS as another site would: coarser pixels (`bcdr_scale`), a brighter
# contrast curve, more noise, a rougher texture and (film subset) softer detail. Strong
# enough that a CBIS-trained classifier loses some AUROC on BCDR, not all of it.
BCDR_STYLES = {
    "D01": AcquisitionStyle(
        texture_beta=2.7, gamma=0.85, noise=0.012, blur=0.0, lesion_gain=0.95, fat_level=0.27, dense_level=0.24
    ),
    "F01": AcquisitionStyle(
        texture_beta=2.8, gamma=0.9, noise=0.014, blur=0.4, lesion_gain=0.9, fat_level=0.25, dense_level=0.26
    ),
}


# --------------------------------------------------------------------------- lesion shapes


@dataclass(frozen=True, eq=False)
class LesionShape:
    """A mass as a star-shaped region around its centre, plus spicules and margin blur.

    The boundary, in the frame of a base ellipse (semi-axes `radius` and
    `radius * axis_ratio`, rotated by `angle`), is
    `r(theta) = radius * (1 + sum_k amp_k * cos(order_k * theta + phase_k))`.

    Attributes:
        irregularity: latent malignancy look in [0, 1] every class-dependent feature derives from.
        radius: px at CBIS resolution, semi-major axis of the base ellipse.
        axis_ratio: minor / major axis of the base ellipse, in (0, 1].
        angle: rad, orientation of the base ellipse.
        orders, amps, phases: boundary harmonics (1-D arrays of equal length).
        spicule_angles: rad, where thin radiating lines leave the boundary.
        spicule_lengths: length of each spicule in units of `radius`.
        spicule_widths: px at CBIS resolution.
        edge: px at CBIS resolution, width of the margin's blur (ill-defined margins are wide).
        contrast: added intensity at the mass (fraction of full scale).
        mass_shape, margins: the CBIS-DDSM descriptors that fit the drawn shape.
    """

    irregularity: float
    radius: float
    axis_ratio: float
    angle: float
    orders: np.ndarray
    amps: np.ndarray
    phases: np.ndarray
    spicule_angles: np.ndarray
    spicule_lengths: np.ndarray
    spicule_widths: np.ndarray
    edge: float
    contrast: float
    mass_shape: str
    margins: str

    def boundary(self, theta: np.ndarray) -> np.ndarray:
        """Boundary radius (in units of `radius`) at ellipse-frame angles `theta`."""
        t = np.asarray(theta, dtype=np.float64)
        r = np.ones_like(t)
        for k, a, p in zip(self.orders, self.amps, self.phases):
            r += a * np.cos(k * t + p)
        return r


def sample_irregularity(
    rng: np.random.Generator, malignant: bool, difficulty: float, size: int | None = None
) -> np.ndarray | float:
    """Draw the latent irregularity in [0, 1] of a mass.

    Benign ~ Beta(2, b) and malignant ~ Beta(b, 2) with `b = 2 + 8 * (1 - difficulty)^2`:
    at difficulty 0 the classes barely overlap, at 0.5 an ideal observer of the latent
    reaches AUROC ~0.9, at 1 the two distributions are identical.

    Args:
        rng: random generator.
        malignant: class of the mass.
        difficulty: in [0, 1].
        size: number of draws (None: one float).
    """
    b = 2.0 + 8.0 * (1.0 - difficulty) ** 2
    return rng.beta(b, 2.0, size) if malignant else rng.beta(2.0, b, size)


def sample_lesion_shape(
    rng: np.random.Generator,
    malignant: bool,
    radius_range: tuple[float, float],
    difficulty: float,
    dense_breast: bool = False,
) -> LesionShape:
    """Draw one mass. Only the latent irregularity depends on the class, so `difficulty` alone
    sets how far the classes overlap.

    Args:
        rng: random generator.
        malignant: class of the mass.
        radius_range: (min, max) px at CBIS resolution.
        difficulty: in [0, 1], see `sample_irregularity`.
        dense_breast: dense breasts hide margins: makes OBSCURED margins likelier.

    Returns:
        The shape with CBIS-DDSM shape and margin descriptors that fit it.
    """
    u = float(sample_irregularity(rng, malignant, difficulty))
    radius = float(rng.uniform(*radius_range))
    axis_ratio = float(rng.uniform(0.6, 1.0))
    angle = float(rng.uniform(0, math.pi))

    # Lobulation (low orders) is class-independent: benign masses are often lobulated too.
    low_orders = np.arange(2, 6)
    lobulated = rng.random() < 0.35
    a_low = float(rng.uniform(0.05, 0.12) if lobulated else rng.uniform(0.0, 0.03))
    low_w = rng.random(low_orders.size)
    low_amps = a_low * low_w / low_w.sum()
    # High orders make the outline irregular; the top order keeps bumps >= ~4 px wide.
    top = int(np.clip(2 * math.pi * radius / 4.0, 7, 16))
    high_orders = np.arange(6, top + 1)
    a_high = 0.50 * u**1.5
    high_w = rng.random(high_orders.size) * high_orders**-0.8
    high_amps = a_high * high_w / high_w.sum()
    orders = np.concatenate([low_orders, high_orders]).astype(np.float64)
    amps = np.concatenate([low_amps, high_amps])
    phases = rng.uniform(0, 2 * math.pi, orders.size)

    n_spicules = int(rng.poisson(50.0 * max(0.0, u - 0.4)))
    spicule_angles = np.sort(rng.uniform(0, 2 * math.pi, n_spicules))
    spicule_lengths = rng.uniform(0.6, 1.6, n_spicules)
    spicule_widths = rng.uniform(1.0, 2.0, n_spicules)

    edge = 0.4 + 3.5 * u + float(rng.uniform(0.0, 0.4))
    contrast = float(rng.uniform(0.12, 0.20)) + 0.12 * u

    if a_high > 0.16:
        mass_shape = "ARCHITECTURAL_DISTORTION" if n_spicules >= 8 and rng.random() < 0.3 else "IRREGULAR"
    elif a_low + a_high > 0.09:
        mass_shape = "LOBULATED"
    elif axis_ratio > 0.82:
        mass_shape = "ROUND"
    else:
        mass_shape = "OVAL"
    if n_spicules >= 4:
        margins = "SPICULATED"
    elif edge > 2.4:
        margins = "ILL_DEFINED"
    elif a_high > 0.07 or lobulated:
        margins = "MICROLOBULATED"
    elif dense_breast and rng.random() < 0.5:
        margins = "OBSCURED"
    else:
        margins = "CIRCUMSCRIBED"
    return LesionShape(
        irregularity=u,
        radius=radius,
        axis_ratio=axis_ratio,
        angle=angle,
        orders=orders,
        amps=amps,
        phases=phases,
        spicule_angles=spicule_angles,
        spicule_lengths=spicule_lengths,
        spicule_widths=spicule_widths,
        edge=edge,
        contrast=contrast,
        mass_shape=mass_shape,
        margins=margins,
    )


@dataclass(frozen=True)
class LesionPlacement:
    """Where and how a lesion shape is drawn on one image.

    Attributes:
        cy, cx: centre (row, column) in px.
        scale: image resolution relative to CBIS (BCDR: `bcdr_scale`) times a per-view jitter.
        rotation: rad added to the shape's orientation (the breast is compressed differently per view).
    """

    cy: float
    cx: float
    scale: float
    rotation: float


def _extent(shape: LesionShape, scale: float) -> int:
    """Half-size in px of a window that holds the whole lesion, spicules and blur included."""
    body = shape.radius * scale * (1.0 + float(np.abs(shape.amps).sum()))
    spic = shape.radius * scale * (float(shape.spicule_lengths.max()) if shape.spicule_lengths.size else 0.0)
    return int(math.ceil(body + spic + 3.0 * shape.edge * scale + 4.0))


def _window(shape: LesionShape, place: LesionPlacement, image_shape: tuple[int, int]):
    """Slices of the image around the lesion and the local frame there.

    Returns:
        (slices, dx, dy, d, rb): column/row offsets from the centre (2-D float arrays), the
        ellipse-frame radius `d` and the boundary radius `rb` there, both in px.
    """
    h, w = image_shape
    half = _extent(shape, place.scale)
    y0, y1 = max(0, int(place.cy) - half), min(h, int(place.cy) + half + 1)
    x0, x1 = max(0, int(place.cx) - half), min(w, int(place.cx) + half + 1)
    dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy -= place.cy
    dx -= place.cx
    phi = shape.angle + place.rotation
    c, s = math.cos(phi), math.sin(phi)
    xe = dx * c + dy * s
    ye = (-dx * s + dy * c) / shape.axis_ratio
    d = np.hypot(xe, ye)
    rb = shape.radius * place.scale * shape.boundary(np.arctan2(ye, xe))
    return (slice(y0, y1), slice(x0, x1)), dx, dy, d, rb


def lesion_mask(shape: LesionShape, place: LesionPlacement, image_shape: tuple[int, int]) -> np.ndarray:
    """The lesion's body (no spicules) as a boolean mask of `image_shape` (what an ROI mask outlines)."""
    mask = np.zeros(image_shape, dtype=bool)
    sl, _, _, d, rb = _window(shape, place, image_shape)
    mask[sl] = d <= rb
    return mask


def lesion_intensity(
    shape: LesionShape, place: LesionPlacement, image_shape: tuple[int, int]
) -> tuple[tuple[slice, slice], np.ndarray]:
    """The intensity a lesion adds to the image: a domed body with a blurred margin plus spicules.

    Returns:
        (slices, values): the window of the image and the added intensity there (float64).
    """
    sl, dx, dy, d, rb = _window(shape, place, image_shape)
    edge = max(0.4, shape.edge * place.scale)
    body = 1.0 / (1.0 + np.exp(-np.clip((rb - d) / edge, -30, 30)))
    dome = 0.75 + 0.25 * np.sqrt(np.clip(1.0 - (d / np.maximum(rb, 1e-6)) ** 2, 0.0, 1.0))
    out = body * dome
    if shape.spicule_angles.size:
        r_start = shape.boundary(shape.spicule_angles)  # ellipse-frame radius where each leaves
        phi = shape.angle + place.rotation
        c, s = math.cos(phi), math.sin(phi)
        r0 = shape.radius * place.scale
        for ang, rs, length, width in zip(
            shape.spicule_angles, r_start, shape.spicule_lengths, shape.spicule_widths
        ):
            # start point on the boundary, image frame (undo the ellipse squash, then rotate)
            xe, ye = rs * r0 * math.cos(ang), rs * r0 * math.sin(ang) * shape.axis_ratio
            px, py = xe * c - ye * s, xe * s + ye * c
            norm = math.hypot(px, py) or 1.0
            ux, uy = px / norm, py / norm
            # start a little inside the body so the line joins it without a gap
            sx, sy = px - 0.3 * r0 * ux, py - 0.3 * r0 * uy
            seg = (length + 0.3) * r0
            along = (dx - sx) * ux + (dy - sy) * uy
            perp = np.abs(-(dx - sx) * uy + (dy - sy) * ux)
            t = np.clip(along / seg, 0.0, 1.0)
            wid = width * place.scale * (1.0 - 0.6 * t)
            line = np.exp(-0.5 * (perp / wid) ** 2) * (1.0 - t) ** 0.7
            line[(along < 0) | (along > seg)] = 0.0
            out = np.maximum(out, line)
    return sl, shape.contrast * out


def lesion_outline(shape: LesionShape, place: LesionPlacement) -> tuple[np.ndarray, np.ndarray]:
    """The body's outline as integer pixel coordinates (x = column, y = row), about one point per px.

    Consecutive duplicates are dropped and the polygon is closed implicitly (the first point
    is not repeated), as in BCDR's `lw_x_points` / `lw_y_points`.
    """
    r0 = shape.radius * place.scale
    n = int(np.clip(2 * math.pi * r0 * 1.2, 24, 600))
    theta = np.linspace(0, 2 * math.pi, n, endpoint=False)
    # Trace the outermost pixels of the body (half a pixel inside its edge), as hand-drawn
    # outlines do: a polygon rasterised border-included then covers the same pixels as the mask.
    rb = np.maximum(shape.boundary(theta) * r0 - 0.5, 0.5)
    xe, ye = rb * np.cos(theta), rb * np.sin(theta) * shape.axis_ratio
    phi = shape.angle + place.rotation
    c, s = math.cos(phi), math.sin(phi)
    xs = np.rint(place.cx + xe * c - ye * s).astype(np.int64)
    ys = np.rint(place.cy + xe * s + ye * c).astype(np.int64)
    keep = np.ones(n, dtype=bool)
    keep[1:] = (np.diff(xs) != 0) | (np.diff(ys) != 0)
    xs, ys = xs[keep], ys[keep]
    if xs.size > 1 and xs[0] == xs[-1] and ys[0] == ys[-1]:
        xs, ys = xs[:-1], ys[:-1]
    return xs, ys


# --------------------------------------------------------------------------- breast images


@functools.lru_cache(maxsize=16)
def _powerlaw_filter(h: int, w: int, beta: float) -> np.ndarray:
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0 / max(h, w)  # the mean is removed afterwards; avoid dividing by zero
    amp = f ** (-beta / 2.0)
    amp.setflags(write=False)
    return amp


def powerlaw_noise(rng: np.random.Generator, shape: tuple[int, int], beta: float) -> np.ndarray:
    """Zero-mean, unit-variance 1/f^beta noise (power spectrum), the classic mammographic texture model.

    Args:
        rng: random generator.
        shape: (height, width).
        beta: spectral exponent (mammograms: about 2.5-3.5).
    """
    h, w = shape
    white = rng.standard_normal((h, w))
    field_ = np.fft.irfft2(np.fft.rfft2(white) * _powerlaw_filter(h, w, float(beta)), s=(h, w))
    field_ -= field_.mean()
    return field_ / (field_.std() + 1e-12)


@dataclass(frozen=True)
class BreastGeometry:
    """The breast outline of one image (chest wall at column 0 before any mirroring).

    Attributes:
        a: px, depth of the half-ellipse from the chest wall.
        b: px, vertical semi-axis.
        cy: px, row of the ellipse centre on the chest wall.
        mirrored: True when the chest wall is on the right (RIGHT breast).
    """

    a: float
    b: float
    cy: float
    mirrored: bool

    def place(self, rho: float, t: float, width: int) -> tuple[float, float]:
        """(row, col) of the point at elliptic radius `rho` and angle `t` (rad, 0 = nipple)."""
        x = self.a * rho * math.cos(t)
        y = self.cy + self.b * rho * math.sin(t)
        return y, (width - 1 - x if self.mirrored else x)


def render_breast(
    rng: np.random.Generator,
    image_shape: tuple[int, int],
    laterality: str,
    view: str,
    density: int,
    style: AcquisitionStyle,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, BreastGeometry]:
    """Draw breast tissue: a half-ellipse against the chest wall filled with 1/f^beta texture.

    The LEFT breast has its chest wall on the left edge, the RIGHT breast on the right edge.
    MLO views add a pectoral muscle in the upper chest-wall corner.

    Args:
        rng: random generator.
        image_shape: (height, width) in px.
        laterality: LEFT or RIGHT.
        view: CC or MLO.
        density: BI-RADS density category 1-4 (sets the dense-tissue fraction).
        style: the site's acquisition style.

    Returns:
        (image, breast, thickness, geometry): linear intensity in about [0, 1] (float64),
        the breast region (bool), the compressed-thickness profile in [0, 1] that scales
        anything added inside the breast, and the outline parameters.
    """
    h, w = image_shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    a = w * rng.uniform(0.74, 0.92)
    if view == "CC":
        cy, b = h * rng.uniform(0.46, 0.54), h * rng.uniform(0.34, 0.44)
    else:
        cy, b = h * rng.uniform(0.40, 0.48), h * rng.uniform(0.42, 0.50)
    rho = np.sqrt((xx / a) ** 2 + ((yy - cy) / b) ** 2)
    breast = rho < 1.0
    # A compressed breast is nearly flat, then thins fast toward the skin line.
    thickness = np.clip(1.0 - rho**2, 0.0, 1.0) ** 0.25

    # Glandular tissue gathers toward the centre behind the nipple: bias the texture by 1 - rho.
    glands = powerlaw_noise(rng, (h, w), style.texture_beta) + 0.8 * (1.0 - np.minimum(rho, 1.0))
    frac = DENSE_FRACTION[density] * rng.uniform(0.85, 1.15)
    inside = glands[breast]
    threshold = np.partition(inside, int((1.0 - frac) * (inside.size - 1)))[int((1.0 - frac) * (inside.size - 1))]
    # A soft threshold: dense tissue fades into fat over a range of the texture, not at an edge.
    dense = 1.0 / (1.0 + np.exp(-np.clip((glands - threshold) / 0.4, -30, 30)))
    fine = powerlaw_noise(rng, (h, w), style.texture_beta - 1.0)
    tissue = style.fat_level + style.dense_level * dense + 0.035 * fine

    if view == "MLO":
        pw, ph = w * rng.uniform(0.22, 0.34), h * rng.uniform(0.38, 0.55)
        pect = np.clip((1.0 - xx / pw - yy / ph) * 12.0, 0.0, 1.0)  # soft-edged triangle
        muscle = style.fat_level + 0.75 * style.dense_level + 0.05 * fine
        tissue = tissue * (1.0 - pect) + muscle * pect
        breast = breast | (pect > 0)
        thickness = np.maximum(thickness, pect)
    image = np.where(breast, thickness * tissue, 0.0)
    if laterality == "RIGHT":
        image, breast, thickness = image[:, ::-1], breast[:, ::-1], thickness[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(breast), np.ascontiguousarray(thickness), BreastGeometry(
        a=a, b=b, cy=cy, mirrored=laterality == "RIGHT"
    )


def _place_lesions(
    rng: np.random.Generator,
    geometry: BreastGeometry,
    image_shape: tuple[int, int],
    shapes: Sequence[LesionShape],
    scale: float,
) -> list[LesionPlacement]:
    """Place lesions inside the breast, away from the image border and from each other."""
    h, w = image_shape
    placed: list[LesionPlacement] = []
    reaches: list[float] = []
    for shape in shapes:
        jitter = scale * float(rng.uniform(0.92, 1.08))
        reach = shape.radius * jitter * (1.0 + float(np.abs(shape.amps).sum()))
        best = None
        for _ in range(200):
            y, x = geometry.place(float(rng.uniform(0.15, 0.72)), float(rng.uniform(-1.2, 1.2)), w)
            inside = reach + 4 <= y <= h - 1 - reach - 4 and reach + 4 <= x <= w - 1 - reach - 4
            apart = all(
                math.hypot(y - p.cy, x - p.cx) > reach + r + 6 for p, r in zip(placed, reaches)
            )
            if inside and apart:
                best = (y, x)
                break
        if best is None:  # crowded small image: spread along the midline, clamped into the frame
            y, x = geometry.place(0.25 + 0.4 * len(placed) / max(1, len(shapes)), 0.0, w)
            best = (float(np.clip(y, reach, h - 1 - reach)), float(np.clip(x, reach, w - 1 - reach)))
        placed.append(LesionPlacement(cy=best[0], cx=best[1], scale=jitter, rotation=float(rng.uniform(-0.4, 0.4))))
        reaches.append(reach)
    return placed


def finish_image(
    rng: np.random.Generator, image: np.ndarray, breast: np.ndarray, style: AcquisitionStyle
) -> np.ndarray:
    """Acquisition: blur, signal-dependent noise, near-zero background, contrast curve.

    Returns:
        Float64 image in [0, 1].
    """
    out = ndimage.gaussian_filter(image, style.blur) if style.blur > 0 else image
    out = out + style.noise * np.sqrt(np.clip(out, 0.0, None) + 0.05) * rng.standard_normal(out.shape)
    background = np.abs(rng.normal(0.0, 0.002, out.shape))
    out = np.where(breast, out, background)
    out = np.clip(out, 0.0, 1.0)
    return out**style.gamma if style.gamma != 1.0 else out


def _pick(rng: np.random.Generator, n: int, rate: float, at_least: int = 1, leave: int = 0) -> np.ndarray:
    """Flag a fixed share of n items at random: round(rate * n), but at least `at_least` and
    leaving at least `leave` unflagged (as far as n allows). A fixed share instead of a coin per
    item makes every quirk and both classes appear even in a tiny phantom."""
    flags = np.zeros(n, dtype=bool)
    k = max(0, min(n - leave, max(at_least, int(round(rate * n)))))
    if k:
        flags[rng.choice(n, size=k, replace=False)] = True
    return flags


# --------------------------------------------------------------------------- DICOM


def _uid(rng: np.random.Generator, used: set[str]) -> str:
    """A CBIS-style UID (`1.3.6.1.4.1.9590.100.1.2.<digits>`) from the generator, unique in `used`."""
    while True:
        n = int(rng.integers(30, 40))  # the root is 25 characters; a UID may hold 64
        digits = rng.integers(0, 10, size=n)
        digits[0] = rng.integers(1, 10)  # a UID component must not start with 0
        uid = UID_ROOT + "".join(map(str, digits.tolist()))
        if uid not in used:
            used.add(uid)
            return uid


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    study_date: str,
    series_description: str,
    instance_number: int,
    photometric: str = "MONOCHROME2",
    rescale: bool = True,
) -> None:
    """Write one uncompressed greyscale DICOM (Explicit VR Little Endian), 8- or 16-bit."""
    bits = 16 if pixels.dtype == np.uint16 else 8
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.Modality = "MG"
    ds.ConversionType = "DF"  # digitised film, as DDSM was
    ds.SeriesDescription = series_description
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.BodyPartExamined = "BREAST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "DDSM"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if rescale:
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
    ds.PixelData = np.ascontiguousarray(pixels.astype(pixels.dtype.newbyteorder("<"))).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------- planning


@dataclass
class _Lesion:
    shape: LesionShape
    malignant: bool
    pathology: str  # MALIGNANT | BENIGN | BENIGN_WITHOUT_CALLBACK
    assessment: int
    subtlety: int


@dataclass
class _Patient:
    number: int
    malignant: bool
    density: int
    age: int
    laterality: str
    views: tuple[str, ...]
    lesions: list[_Lesion]


def _sample_patient(
    rng: np.random.Generator,
    number: int,
    cfg: PhantomConfig,
    malignant: bool,
    two_lesions: bool = False,
    both_views: bool = False,
) -> _Patient:
    """Draw a patient's attributes and masses; attributes depend mildly on pathology.

    Args:
        rng: the patient's own generator.
        number: case number.
        cfg: phantom settings (mass radius range, difficulty).
        malignant: pathology of the first mass.
        two_lesions: the breast holds two masses (abnormality ids 1 and 2).
        both_views: CC and MLO images of the breast (else one view).
    """
    density = int(rng.choice([1, 2, 3, 4], p=[0.12, 0.38, 0.33, 0.17] if malignant else [0.15, 0.40, 0.30, 0.15]))
    age = int(np.clip(round(rng.normal(61.0 if malignant else 54.0, 11.0)), 28, 90))
    laterality = "LEFT" if rng.random() < 0.5 else "RIGHT"
    single_view = ("CC",) if rng.random() < 0.53 else ("MLO",)
    views = ("CC", "MLO") if both_views else single_view
    n_lesions = 2 if two_lesions else 1
    lesions = []
    for i in range(n_lesions):
        # A second mass mostly shares the first's pathology, as in real multi-lesion cases.
        mal = malignant if (i == 0 or rng.random() < 0.8) else not malignant
        shape = sample_lesion_shape(rng, mal, cfg.mass_radius, cfg.difficulty, dense_breast=density >= 3)
        if mal:
            pathology = "MALIGNANT"
            assessment = int(rng.choice([2, 3, 4, 5], p=[0.03, 0.07, 0.50, 0.40]))
        else:
            pathology = "BENIGN_WITHOUT_CALLBACK" if rng.random() < 0.25 else "BENIGN"
            assessment = int(rng.choice([2, 3, 4, 5], p=[0.30, 0.30, 0.35, 0.05]))
        lo, hi = cfg.mass_radius
        size_term = (shape.radius - lo) / (hi - lo) if hi > lo else 0.5
        visible = 0.6 * (shape.contrast - 0.08) / 0.18 + 0.4 * size_term + rng.normal(0.0, 0.12)
        subtlety = int(np.clip(round(1 + 4 * visible), 1, 5))
        lesions.append(_Lesion(shape, mal, pathology, assessment, subtlety))
    return _Patient(number, malignant, density, age, laterality, views, lesions)


def _patient_numbers(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct, sorted, gappy patient numbers (real case numbers are not contiguous)."""
    return np.sort(rng.choice(np.arange(1, 3 * n + 20), size=n, replace=False))


def _check(cfg: PhantomConfig) -> None:
    def bad(name: str, msg: str) -> None:
        raise ConfigError(msg, field=f"phantom.{name}")

    if cfg.cbis_train_patients < 1:
        bad("cbis_train_patients", "must be >= 1")
    if cfg.cbis_test_patients < 1:
        bad("cbis_test_patients", "must be >= 1")
    if cfg.bcdr_patients < len(BCDR_SUBSETS):
        bad("bcdr_patients", f"must be >= {len(BCDR_SUBSETS)} (one per BCDR subset)")
    if cfg.image_height < 128:
        bad("image_height", "must be at least 128 px")
    if cfg.image_width < 96:
        bad("image_width", "must be at least 96 px")
    if not 0.25 <= cfg.bcdr_scale <= 2.0:
        bad("bcdr_scale", "must be in [0.25, 2]")
    lo, hi = cfg.mass_radius
    if not 2.0 <= lo <= hi:
        bad("mass_radius", f"need 2 <= min <= max, got [{lo}, {hi}]")
    if hi * 6 > min(cfg.image_height, cfg.image_width):
        bad("mass_radius", "masses must fit the breast: max radius <= min(image side) / 6")
    if not 0.0 <= cfg.difficulty <= 1.0:
        bad("difficulty", "must be in [0, 1]")


# --------------------------------------------------------------------------- CBIS-DDSM


@dataclass(frozen=True)
class PhantomSummary:
    """What `write_phantom` wrote.

    Attributes:
        cbis_rows: CSV rows (abnormalities) per split, e.g. {"train": 160, "test": 52}.
        cbis_images: full mammograms per split.
        cbis_malignant: malignant rows per split.
        bcdr_patients: patients per subset.
        bcdr_rows: outline rows per subset (mass and non-mass).
        bcdr_mass_rows: mass rows (mammography_nodule = 1) per subset.
        bcdr_malignant: malignant mass rows per subset.
        bcdr_images: PNG images per subset.
    """

    cbis_rows: dict[str, int]
    cbis_images: dict[str, int]
    cbis_malignant: dict[str, int]
    bcdr_patients: dict[str, int]
    bcdr_rows: dict[str, int]
    bcdr_mass_rows: dict[str, int]
    bcdr_malignant: dict[str, int]
    bcdr_images: dict[str, int]


def _tcia_folder(date: str, uid: str) -> str:
    return f"{date}-DDSM-{uid[-5:]}"


def _series_folder(description: str, uid: str) -> str:
    return f"1.000000-{description}-{uid[-5:]}"


@dataclass
class _CbisPatientJob:
    """What one CBIS patient's images need: its draws, generator and per-image/ROI flags."""

    tree: Path
    prefix: str
    patient: Any
    rng: np.random.Generator
    shape: tuple[int, int]
    mono1: np.ndarray  # per image (view)
    no_rescale: np.ndarray
    off_size: np.ndarray  # per ROI, views x lesions
    separate: np.ndarray
    mask_second_on_disk: np.ndarray
    mask_second_in_csv: np.ndarray


def _write_cbis_patient(job: _CbisPatientJob) -> tuple[list[dict], list[str]]:
    """Render and write one patient's images, masks and crops; (CSV rows, UIDs drawn).

    Everything is drawn from the patient's own generator, so patients can be written in any
    order, in any process, with the same bytes.
    """
    patient, rng, tree, prefix = job.patient, job.rng, job.tree, job.prefix
    h, w = job.shape
    used: set[str] = set()
    rows = []
    pid = f"P_{patient.number:05d}"
    for iv, view in enumerate(patient.views):
        folder = f"{prefix}_{pid}_{patient.laterality}_{view}"
        image, breast, thickness, geometry = render_breast(
            rng, (h, w), patient.laterality, view, patient.density, CBIS_STYLE
        )
        shapes = [lesion.shape for lesion in patient.lesions]
        places = _place_lesions(rng, geometry, (h, w), shapes, 1.0)
        for shape, place in zip(shapes, places):
            sl, add = lesion_intensity(shape, place, (h, w))
            image[sl] += thickness[sl] * add * CBIS_STYLE.lesion_gain
        pixels = np.rint(finish_image(rng, image, breast, CBIS_STYLE) * 65535.0).astype(np.uint16)
        study, series, sop = (_uid(rng, used) for _ in range(3))
        photometric = "MONOCHROME1" if job.mono1[iv] else "MONOCHROME2"
        stored = (65535 - pixels).astype(np.uint16) if job.mono1[iv] else pixels
        _write_dicom(
            tree / folder / _tcia_folder(FULL_STUDY_DATE[1], study)
            / _series_folder("full mammogram images", series) / "1-1.dcm",
            stored,
            patient_id=folder,
            study_uid=study,
            series_uid=series,
            sop_uid=sop,
            study_date=FULL_STUDY_DATE[0],
            series_description="full mammogram images",
            instance_number=1,
            photometric=photometric,
            rescale=not job.no_rescale[iv],
        )
        image_path = f"{folder}/{study}/{series}/000000.dcm"

        for k, (lesion, place) in enumerate(zip(patient.lesions, places)):
            ri = iv * len(patient.lesions) + k
            roi_folder = f"{folder}_{k + 1}"
            mask = lesion_mask(lesion.shape, place, (h, w))
            rows_, cols_ = np.nonzero(mask)
            margin = int(rng.integers(6, 24))
            y0, y1 = max(0, rows_.min() - margin), min(h, rows_.max() + margin + 1)
            x0, x1 = max(0, cols_.min() - margin), min(w, cols_.max() + margin + 1)
            crop = pixels[y0:y1, x0:x1].copy()
            mask_px = mask.astype(np.uint8) * 255
            if job.off_size[ri]:
                # Real CBIS has a few masks some rows/cols off their image: pad or cut at
                # the bottom/right so the lesion stays where it is.
                dr, dc = 0, 0
                while dr == 0 and dc == 0:
                    dr, dc = (int(v) for v in rng.integers(-4, 5, size=2))
                resized = np.zeros((h + dr, w + dc), dtype=np.uint8)
                ch, cw = min(h, h + dr), min(w, w + dc)
                resized[:ch, :cw] = mask_px[:ch, :cw]
                mask_px = resized
            roi_study, mask_series, mask_sop, crop_sop = (_uid(rng, used) for _ in range(4))
            study_dir = tree / roi_folder / _tcia_folder(ROI_STUDY_DATE[1], roi_study)
            common = dict(patient_id=roi_folder, study_uid=roi_study, study_date=ROI_STUDY_DATE[0])
            if job.separate[ri]:
                crop_series = _uid(rng, used)
                mask_file = study_dir / _series_folder("ROI mask images", mask_series) / "1-1.dcm"
                crop_file = study_dir / _series_folder("cropped images", crop_series) / "1-1.dcm"
                mask_csv = f"{roi_folder}/{roi_study}/{mask_series}/000000.dcm\n"
                crop_csv = f"{roi_folder}/{roi_study}/{crop_series}/000000.dcm\n"
                mask_no, crop_no, crop_desc = 1, 1, "cropped images"
            else:
                crop_series = mask_series
                series_dir = study_dir / _series_folder("ROI mask images", mask_series)
                mask_no, crop_no = (2, 1) if job.mask_second_on_disk[ri] else (1, 2)
                mask_file, crop_file = series_dir / f"1-{mask_no}.dcm", series_dir / f"1-{crop_no}.dcm"
                m_name, c_name = ("000001", "000000") if job.mask_second_in_csv[ri] else ("000000", "000001")
                mask_csv = f"{roi_folder}/{roi_study}/{mask_series}/{m_name}.dcm\n"
                crop_csv = f"{roi_folder}/{roi_study}/{crop_series}/{c_name}.dcm\n"
                crop_desc = "ROI mask images"
            _write_dicom(
                mask_file, mask_px, series_uid=mask_series, sop_uid=mask_sop,
                series_description="ROI mask images", instance_number=mask_no, **common,
            )
            _write_dicom(
                crop_file, crop, series_uid=crop_series, sop_uid=crop_sop,
                series_description=crop_desc, instance_number=crop_no, **common,
            )
            rows.append(
                {
                    "patient_id": pid,
                    "breast_density": patient.density,
                    "left or right breast": patient.laterality,
                    "image view": view,
                    "abnormality id": k + 1,
                    "abnormality type": "mass",
                    "mass shape": lesion.shape.mass_shape,
                    "mass margins": lesion.shape.margins,
                    "assessment": lesion.assessment,
                    "pathology": lesion.pathology,
                    "subtlety": lesion.subtlety,
                    "image file path": image_path,
                    "cropped image file path": crop_csv,
                    "ROI mask file path": mask_csv,
                }
            )

    return rows, sorted(used)


def _map_patients(fn, jobs: list, workers: int, progress: Callable[[int], None] | None):
    """`fn` over `jobs` (in up to `workers` processes), results in order, `progress(1)` each."""
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            yield fn(job)
            if progress is not None:
                progress(1)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))):
            yield result
            if progress is not None:
                progress(1)


def _write_cbis_split(
    root: Path, split: str, cfg: PhantomConfig, used_uids: set[str], progress: Callable[[int], None] | None,
    patient_offset: int = 0, workers: int = 1,
) -> tuple[int, int, int]:
    """Write one split's CSV and DICOM files; returns (rows, images, malignant rows)."""
    code = {"train": 1, "test": 2}[split]
    n = cfg.cbis_train_patients if split == "train" else cfg.cbis_test_patients
    prefix = "Mass-Training" if split == "train" else "Mass-Test"
    split_rng = np.random.default_rng([cfg.seed, code])
    # Train and test patients are disjoint: draw all numbers once, then deal them out.
    numbers_rng = np.random.default_rng([cfg.seed, 0])
    all_numbers = _patient_numbers(numbers_rng, cfg.cbis_train_patients + cfg.cbis_test_patients)
    order = numbers_rng.permutation(all_numbers.size)
    mine = order[: cfg.cbis_train_patients] if split == "train" else order[cfg.cbis_train_patients :]
    numbers = np.sort(all_numbers[mine]) + patient_offset  # offset: another set's patient namespace

    malignant = _pick(split_rng, n, MALIGNANT_FRACTION_CBIS, at_least=1, leave=1)
    two_lesions = _pick(split_rng, n, TWO_LESION_RATE)
    both_views = _pick(split_rng, n, BOTH_VIEWS_RATE)
    patients = []
    for i, number in enumerate(numbers):
        rng = np.random.default_rng([cfg.seed, code, int(number)])
        patient = _sample_patient(rng, int(number), cfg, bool(malignant[i]), bool(two_lesions[i]), bool(both_views[i]))
        patients.append((patient, rng))
    images = [(p, v) for p, _ in patients for v in p.views]
    rois = [(p, v, k) for p, v in images for k in range(len(p.lesions))]
    mono1 = _pick(split_rng, len(images), MONOCHROME1_RATE)
    no_rescale = _pick(split_rng, len(images), NO_RESCALE_RATE)
    off_size = _pick(split_rng, len(rois), OFF_SIZE_MASK_RATE)
    separate = _pick(split_rng, len(rois), SEPARATE_CROP_SERIES_RATE)
    # Where mask and crop share a series, either may be 1-1 on disk and either 000000 in the
    # CSV, independently: both orders appear whenever two ROIs share a series.
    shared = np.flatnonzero(~separate)
    mask_second_on_disk = np.zeros(len(rois), dtype=bool)
    mask_second_in_csv = np.zeros(len(rois), dtype=bool)
    mask_second_on_disk[shared] = _pick(split_rng, shared.size, 0.5, at_least=1, leave=1)
    mask_second_in_csv[shared] = _pick(split_rng, shared.size, 0.5, at_least=1, leave=1)
    image_index = {(p.number, v): i for i, (p, v) in enumerate(images)}
    roi_index = {(p.number, v, k): i for i, (p, v, k) in enumerate(rois)}

    tree = root / "CBIS-DDSM"
    jobs = []
    for patient, rng in patients:
        ii = [image_index[(patient.number, v)] for v in patient.views]
        ri = [roi_index[(patient.number, v, k)] for v in patient.views for k in range(len(patient.lesions))]
        jobs.append(_CbisPatientJob(
            tree, prefix, patient, rng, (cfg.image_height, cfg.image_width),
            mono1[ii], no_rescale[ii], off_size[ri], separate[ri], mask_second_on_disk[ri], mask_second_in_csv[ri],
        ))
    rows = []
    for patient_rows, uids in _map_patients(_write_cbis_patient, jobs, workers, progress):
        rows.extend(patient_rows)
        clash = used_uids.intersection(uids)
        if clash or len(set(uids)) < len(uids):
            # Each patient's UIDs are drawn from its own generator (unique within the patient);
            # two patients drawing the same 30-40 random digits does not happen in practice.
            raise DataError(f"phantom: two patients drew the same DICOM UID {sorted(clash)[:1]}; "
                            "change phantom.seed", field="phantom.seed")
        used_uids.update(uids)

    table = pd.DataFrame(rows, columns=list(CBIS_COLUMNS))
    table = table.sort_values(
        ["patient_id", "left or right breast", "image view", "abnormality id"], kind="stable"
    )
    set_name = "train" if split == "train" else "test"
    table.to_csv(root / f"mass_case_description_{set_name}_set.csv", index=False, lineterminator="\n")
    return len(table), len(images), int((table["pathology"] == "MALIGNANT").sum())


# --------------------------------------------------------------------------- BCDR


def _calcification_cluster(
    rng: np.random.Generator, geometry: BreastGeometry, image_shape: tuple[int, int], scale: float
) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]:
    """A cluster of microcalcifications: its outline (x, y) and the specks' centres."""
    h, w = image_shape
    y, x = geometry.place(float(rng.uniform(0.2, 0.6)), float(rng.uniform(-0.8, 0.8)), w)
    radius = float(rng.uniform(6.0, 12.0)) * scale
    y = float(np.clip(y, radius + 3, h - radius - 4))
    x = float(np.clip(x, radius + 3, w - radius - 4))
    n = int(rng.integers(5, 14))
    ang, rad = rng.uniform(0, 2 * math.pi, n), radius * np.sqrt(rng.uniform(0, 0.8, n))
    specks = [(y + r * math.sin(t), x + r * math.cos(t)) for r, t in zip(rad, ang)]
    theta = np.linspace(0, 2 * math.pi, max(16, int(2 * math.pi * radius)), endpoint=False)
    wobble = 1.0 + 0.08 * np.cos(3 * theta + rng.uniform(0, 2 * math.pi))
    xs = np.rint(x + radius * wobble * np.cos(theta)).astype(np.int64)
    ys = np.rint(y + radius * wobble * np.sin(theta)).astype(np.int64)
    keep = np.ones(xs.size, dtype=bool)
    keep[1:] = (np.diff(xs) != 0) | (np.diff(ys) != 0)
    return xs[keep], ys[keep], specks


def _points(values: np.ndarray) -> str:
    """BCDR's point lists: space-separated integers, the string starting with a space."""
    return "".join(f" {int(v)}" for v in values)


def _classification(malignant: bool, lower: bool, spaced: bool, rng: np.random.Generator) -> str:
    text = "Malign" if malignant else "Benign"
    if lower:
        text = text.lower()
    if spaced:
        text = [f" {text} ", f" {text}", f"{text} "][int(rng.integers(0, 3))]
    return text


def _write_bcdr(root: Path, cfg: PhantomConfig, progress: Callable[[int], None] | None) -> dict[str, dict[str, int]]:
    """Write the BCDR subsets; returns the `bcdr_*` counts of `PhantomSummary` (per subset)."""
    top = np.random.default_rng([cfg.seed, 3])
    n = cfg.bcdr_patients
    numbers = _patient_numbers(top, n)
    study_ids = np.sort(top.choice(np.arange(1, 4 * n + 20), size=n, replace=False))
    subset_of = np.empty(n, dtype=object)
    perm = top.permutation(n)
    subset_of[perm[: (n + 1) // 2]] = BCDR_SUBSETS[0]
    subset_of[perm[(n + 1) // 2 :]] = BCDR_SUBSETS[1]
    malignant_patient = _pick(top, n, MALIGNANT_FRACTION_BCDR, at_least=1, leave=1)
    two_lesions = _pick(top, n, TWO_LESION_RATE)
    both_views = _pick(top, n, BOTH_VIEWS_RATE)
    na_density = _pick(top, n, BCDR_NA_DENSITY_RATE)
    non_mass = _pick(top, n, BCDR_NON_MASS_RATE)
    lesion_counter = int(top.integers(1, 500))
    segmentation_counter = int(top.integers(1, 500))

    h, w = int(round(cfg.image_height * cfg.bcdr_scale)), int(round(cfg.image_width * cfg.bcdr_scale))
    rows: dict[str, list[dict]] = {s: [] for s in BCDR_SUBSETS}
    images: dict[str, int] = {s: 0 for s in BCDR_SUBSETS}
    for i in range(n):
        number, subset = int(numbers[i]), str(subset_of[i])
        style = BCDR_STYLES[subset]
        rng = np.random.default_rng([cfg.seed, 3, number])
        patient = _sample_patient(
            rng, number, cfg, bool(malignant_patient[i]), bool(two_lesions[i]), bool(both_views[i])
        )
        lesion_ids = list(range(lesion_counter, lesion_counter + len(patient.lesions) + 1))
        lesion_counter += len(lesion_ids)
        calc_malignant = bool(rng.random() < 0.4)
        study = int(study_ids[i])
        folder = root / f"BCDR-{subset}_dataset"
        for view in patient.views:
            code = BCDR_VIEW_CODE[(patient.laterality, view)]
            rel = f"patient_{number}/study_{study}/img_{number}_{study}_1_{BCDR_VIEW_NAME[code]}.png"
            image, breast, thickness, geometry = render_breast(
                rng, (h, w), patient.laterality, view, patient.density, style
            )
            shapes = [lesion.shape for lesion in patient.lesions]
            places = _place_lesions(rng, geometry, (h, w), shapes, cfg.bcdr_scale)
            outlines = []  # (lesion or None for a non-mass finding, malignant, lesion id, xs, ys)
            for lesion, lid, place in zip(patient.lesions, lesion_ids, places):
                sl, add = lesion_intensity(lesion.shape, place, (h, w))
                image[sl] += thickness[sl] * add * style.lesion_gain
                outlines.append((lesion, lesion.malignant, lid, *lesion_outline(lesion.shape, place)))
            if non_mass[i]:
                xs, ys, specks = _calcification_cluster(rng, geometry, (h, w), cfg.bcdr_scale)
                for sy, sx in specks:
                    yy, xx = int(round(sy)), int(round(sx))
                    image[yy - 1 : yy + 1, xx - 1 : xx + 1] += 0.35 * thickness[yy, xx]
                outlines.append((None, calc_malignant, lesion_ids[-1], xs, ys))
            pixels = np.rint(finish_image(rng, image, breast, style) * 255.0).astype(np.uint8)
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(target, format="PNG", optimize=False)
            images[subset] += 1
            for lesion, malignant, lid, xs, ys in outlines:
                is_mass = lesion is not None
                spiculated = is_mass and lesion.shape.margins == "SPICULATED"
                if is_mass:  # a few masses carry calcifications too; they are still masses
                    calc, micro = int(rng.random() < 0.1), 0
                else:  # a non-mass finding: calcifications or microcalcifications
                    calc = int(rng.random() < 0.5)
                    micro = 1 - calc
                rows[subset].append(
                    {
                        "patient_id": number,
                        "study_id": study,
                        "series": 1,
                        "lesion_id": lid,
                        "segmentation_id": segmentation_counter,
                        "image_view": code,
                        "image_filename": f" {rel}",
                        "lw_x_points": _points(xs),
                        "lw_y_points": _points(ys),
                        "mammography_type": 1 if subset.startswith("D") else 0,
                        "mammography_nodule": int(is_mass),
                        "mammography_calcification": calc,
                        "mammography_microcalcification": micro,
                        "mammography_axillary_adenopathy": 0,
                        "mammography_architectural_distortion": int(
                            spiculated and lesion.shape.mass_shape == "ARCHITECTURAL_DISTORTION"
                        ),
                        "mammography_stroma_distortion": int(spiculated and rng.random() < 0.3),
                        "age": patient.age,
                        "density": " N/A" if na_density[i] else patient.density,
                        "classification": malignant,  # spelled out per subset below
                    }
                )
                segmentation_counter += 1
        if progress is not None:
            progress(1)

    counts: dict[str, dict[str, int]] = {
        k: {} for k in ("bcdr_patients", "bcdr_rows", "bcdr_mass_rows", "bcdr_malignant", "bcdr_images")
    }
    for subset in BCDR_SUBSETS:
        table = pd.DataFrame(rows[subset], columns=list(BCDR_COLUMNS))
        m = len(table)
        lower, spaced = _pick(top, m, 0.3), _pick(top, m, 0.3)
        table["classification"] = [
            _classification(bool(mal), bool(lo), bool(sp), top)
            for mal, lo, sp in zip(table["classification"], lower, spaced)
        ]
        folder = root / f"BCDR-{subset}_dataset"
        folder.mkdir(parents=True, exist_ok=True)
        table.to_csv(folder / f"bcdr_{subset.lower()}_outlines.csv", index=False, lineterminator="\n")
        mass = table["mammography_nodule"] == 1
        counts["bcdr_patients"][subset] = int((subset_of == subset).sum())
        counts["bcdr_rows"][subset] = m
        counts["bcdr_mass_rows"][subset] = int(mass.sum())
        malignant = table["classification"].str.strip().str.lower() == "malign"
        counts["bcdr_malignant"][subset] = int((mass & malignant).sum())
        counts["bcdr_images"][subset] = images[subset]
    return counts


# --------------------------------------------------------------------------- entry point


def _readme(cfg: PhantomConfig, summary: PhantomSummary) -> str:
    h, w = cfg.image_height, cfg.image_width
    hb, wb = int(round(h * cfg.bcdr_scale)), int(round(w * cfg.bcdr_scale))
    table = [
        "| part | patients | images | mass rows | malignant mass rows | other rows |",
        "|---|---|---|---|---|---|",
    ]
    for split, patients in (("train", cfg.cbis_train_patients), ("test", cfg.cbis_test_patients)):
        table.append(
            f"| cbis-ddsm {split} | {patients} | {summary.cbis_images[split]} | {summary.cbis_rows[split]} "
            f"| {summary.cbis_malignant[split]} | 0 |"
        )
    for s in BCDR_SUBSETS if summary.bcdr_patients else ():
        table.append(
            f"| bcdr {s} | {summary.bcdr_patients[s]} | {summary.bcdr_images[s]} | {summary.bcdr_mass_rows[s]} "
            f"| {summary.bcdr_malignant[s]} | {summary.bcdr_rows[s] - summary.bcdr_mass_rows[s]} |"
        )
    lo, hi = cfg.mass_radius
    return f"""# Phantom mammography data (synthetic)

Written by `mammodp phantom`. Every image here is synthetic: no patient data. It mimics the
on-disk formats of CBIS-DDSM (masses) and BCDR so that the real importers read it as they
read the real data sets, quirks included.

Settings: seed {cfg.seed}, difficulty {cfg.difficulty:g}, mass radius {lo:g}-{hi:g} px; CBIS images
{h} x {w} px (16-bit DICOM); BCDR images {hb} x {wb} px (8-bit PNG, scale {cfg.bcdr_scale:g}).

{chr(10).join(table)}

Signal: benign masses are round or oval with sharp margins; malignant masses are irregular,
often spiculated, with blurred margins and a little more contrast. A latent irregularity
drives these features; its class-conditional distributions overlap more as `difficulty`
grows. Breast tissue is 1/f^beta noise whose dense fraction follows breast density. BCDR
images come from another "site": coarser pixels, another contrast curve, more noise.

Quirks reproduced: newline-terminated ROI / cropped path cells; CSV paths name `00000x.dcm`
while files are `1-1.dcm` / `1-2.dcm` in TCIA-style folders; mask and crop in either order
(sometimes in separate series); a few masks a few px off their image's size; a few
MONOCHROME1 mammograms and a few without Rescale tags; BCDR file names and point lists with
leading spaces, ` N/A` densities, `Benign` / `Malign` in varying case and whitespace, and
non-mass (calcification) rows.
"""


def write_phantom(
    root: str | Path, cfg: PhantomConfig, progress: Callable[[int], None] | None = None, *,
    patient_offset: int = 0, bcdr: bool = True, workers: int = 1,
) -> PhantomSummary:
    """Write the phantom data set below `root` (`cbis-ddsm/`, `bcdr/`, `PHANTOM.md`).

    Args:
        root: folder to write into (created if absent); existing files of the same names are
            overwritten, nothing else is touched.
        cfg: sizes, seed and difficulty.
        progress: called with 1 after each patient (CBIS train, CBIS test, BCDR in turn);
            `cfg.cbis_train_patients + cfg.cbis_test_patients + cfg.bcdr_patients` calls in all.
        patient_offset: added to every CBIS patient number (`P_<number>`): a second phantom
            (the public pretraining set) drawn with another seed gets patients disjoint from
            the first's (whose numbers stay below 3 x patients + 20).
        bcdr: also write the BCDR-layout external set (the public set has none).
        workers: processes rendering CBIS patients (each patient has its own generator:
            the same bytes for any number of workers).

    Returns:
        Counts of what was written.

    Raises:
        ConfigError: a setting is out of range (names the `phantom.*` key).
    """
    _check(cfg)
    root = Path(root)
    cbis = root / "cbis-ddsm"
    cbis.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    rows, imgs, mal = {}, {}, {}
    for split in ("train", "test"):
        rows[split], imgs[split], mal[split] = _write_cbis_split(cbis, split, cfg, used, progress, patient_offset, workers)
    ext = _write_bcdr(root / "bcdr", cfg, progress) if bcdr else {
        f.name: {} for f in fields(PhantomSummary) if f.name.startswith("bcdr_")}
    summary = PhantomSummary(cbis_rows=rows, cbis_images=imgs, cbis_malignant=mal, **ext)
    (root / "PHANTOM.md").write_text(_readme(cfg, summary))
    return summary


__all__ = [
    "AcquisitionStyle",
    "BCDR_COLUMNS",
    "BCDR_STYLES",
    "BreastGeometry",
    "CBIS_COLUMNS",
    "CBIS_STYLE",
    "LesionPlacement",
    "LesionShape",
    "PhantomSummary",
    "finish_image",
    "lesion_intensity",
    "lesion_mask",
    "lesion_outline",
    "powerlaw_noise",
    "render_breast",
    "sample_irregularity",
    "sample_lesion_shape",
    "write_phantom",
]
