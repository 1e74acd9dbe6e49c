"""Stage `mammodp phantom`: write the built-in phantom data set (CBIS-DDSM and BCDR layouts).

The phantom stands in for the real data sets wherever they are absent (tests, CI, demos).
It is written atomically: a crash leaves OUT as it was, never half-written.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from mammodp.config import Config
from mammodp.data.phantom import write_phantom
from mammodp.io import atomic_dir
from mammodp.stages.prepare import import_source

SOURCES = ("cbis-ddsm", "bcdr")  # the folders an existing raw-data tree would hold


def public_phantom_config(cfg: Config):
    """The public pretraining set's phantom: `cfg.phantom`'s look, `cfg.pretrain`'s seed and sizes."""
    from dataclasses import replace

    pt = cfg.pretrain
    return replace(cfg.phantom, seed=pt.seed, cbis_train_patients=pt.train_patients,
                   cbis_test_patients=pt.test_patients)


def run_public(cfg: Config, out: Path) -> None:
    """Write the PUBLIC pretraining set into `out`, atomically: `raw/` (CBIS-DDSM layout only)
    and `prepared/` (its patches and manifest, imported like the private set).

    Its patients are numbered from `pretrain.patient_offset`, so none is a patient of the
    private phantom (`config` checks the offset clears the private numbers; `mammodp pretrain`
    checks the prepared sets themselves). With `pretrain.enabled: false` nothing is drawn
    (an empty set with a note), and the pretrain stage writes no weights.
    """
    out = Path(out)
    pc = public_phantom_config(cfg)
    with atomic_dir(out) as tmp:
        if not cfg.pretrain.enabled:
            (tmp / "DISABLED.md").write_text("pretrain.enabled is false: no public set was drawn.\n")
            print(f"phantom --public: pretrain.enabled is false; {out} holds no data")
            return
        with tqdm(total=pc.cbis_train_patients + pc.cbis_test_patients, desc="public phantom", unit="patient") as bar:
            summary = write_phantom(tmp / "raw", pc, progress=bar.update, patient_offset=cfg.pretrain.patient_offset,
                                    bcdr=False, workers=cfg.prepare.workers)
        # ...and imported exactly as the private CBIS set is (same patch geometry and splits).
        df, _ = import_source(cfg, "cbis-ddsm", tmp / "raw" / "cbis-ddsm", tmp / "prepared")
    print(f"phantom --public: wrote {out} (seed {pc.seed}, patients from P_{cfg.pretrain.patient_offset:05d}): "
          f"{summary.cbis_rows['train']} train / {summary.cbis_rows['test']} test masses, "
          f"{len(df)} patches in {out / 'prepared'}")


def run(cfg: Config, out: Path, if_missing: bool = False) -> None:
    """Generate the phantom into `out` from `cfg.phantom`.

    Args:
        cfg: the whole configuration; only `cfg.phantom` is read.
        out: folder that receives `cbis-ddsm/`, `bcdr/` and `PHANTOM.md`. It is replaced
            whole on success.
        if_missing: do nothing when `out` already holds `cbis-ddsm/` or `bcdr/` (real data
            or an earlier phantom), so a pipeline can fall back to the phantom without ever
            overwriting real data.

    Raises:
        ConfigError: a `phantom.*` setting is out of range.
    """
    out = Path(out)
    present = [name for name in SOURCES if (out / name).exists()]
    if if_missing and present:
        print(f"phantom: {out} already holds {', '.join(present)}; left as it is (--if-missing)")
        return
    pc = cfg.phantom
    total = pc.cbis_train_patients + pc.cbis_test_patients + pc.bcdr_patients
    with atomic_dir(out) as tmp, tqdm(total=total, desc="phantom", unit="patient") as bar:
        summary = write_phantom(tmp, pc, progress=bar.update, workers=cfg.prepare.workers)
    print(
        f"phantom: wrote {out} (seed {pc.seed}): CBIS-DDSM "
        f"{summary.cbis_rows['train']} train / {summary.cbis_rows['test']} test masses on "
        f"{summary.cbis_images['train'] + summary.cbis_images['test']} images; BCDR "
        f"{sum(summary.bcdr_mass_rows.values())} masses on {sum(summary.bcdr_images.values())} images"
    )
