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

SOURCES = ("cbis-ddsm", "bcdr")  # the folders an existing raw-data tree would hold


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
        summary = write_phantom(tmp, pc, progress=bar.update)
    print(
        f"phantom: wrote {out} (seed {pc.seed}): CBIS-DDSM "
        f"{summary.cbis_rows['train']} train / {summary.cbis_rows['test']} test masses on "
        f"{summary.cbis_images['train'] + summary.cbis_images['test']} images; BCDR "
        f"{sum(summary.bcdr_mass_rows.values())} masses on {sum(summary.bcdr_images.values())} images"
    )
