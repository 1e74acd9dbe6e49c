"""The demo's targets (issue 9) from a finished pipeline, and optionally its per-stage wall times.

    .venv/bin/python bench/demo_report.py            # after `make repro`: read the outputs
    .venv/bin/python bench/demo_report.py --repro    # time `dvc repro --force` stage by stage first
    .venv/bin/python bench/demo_report.py --repro --no-preload   # the same, one process per stage

Prints, from `metrics/` of the workspace:
- internal / external AUROC [95% CI] of every regime at every budget (`metrics/eval/`);
- the Swin-vs-baseline gap: best non-private Swin regime against non-private `radiomics-linear`
  (target: within 0.03), and per finite budget the Swin regimes against the DP baseline;
- whether some Swin regime's internal CI lies above chance at eps 6;
- the widest internal AUROC CI half-width (target: at most 0.05);
- FRD real-synth against internal-external and real-real (target: real-synth below
  internal-external, the paper's order) and the `synth` regime's internal AUROC (target >= 0.75).

With --repro it first runs `mammodp preload -- dvc repro --force` as `make repro` does (every
stage, in the order DVC chooses; --no-preload: plain `dvc repro --force`), reads
DVC's "Running stage" lines as they come and prints each stage's wall time, process start-up
included (what a user waits for), and the total. Wall times depend on the machine and on what
else runs on it: compare runs made side by side, not across days.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWIN_REGIMES = ("real", "real+synth", "synth-pretrain+dp-finetune", "synth")
BASELINE = "radiomics-linear"


def time_stages(cmd: list[str]) -> dict[str, float]:
    """Run `cmd` (a `dvc repro`), echo its output, return {stage: wall seconds} in run order."""
    env = dict(os.environ, PATH=f"{ROOT / '.venv/bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    times: dict[str, float] = {}
    current, started = None, time.perf_counter()
    t0 = started
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            m = re.match(r"Running stage '([^']+)'", line)
            if m:
                now = time.perf_counter()
                if current is not None:
                    times[current] = now - started
                current, started = m.group(1), now
        rc = proc.wait()
    if current is not None:
        times[current] = time.perf_counter() - started
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {rc}")
    times["(total)"] = time.perf_counter() - t0
    return times


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def cell(row: dict) -> str:
    return f"{row['auroc']:.3f} [{row['auroc_lo']:.3f}-{row['auroc_hi']:.3f}]" if row else "-"


def report(root: Path) -> list[str]:
    """The target lines; every figure read from the pipeline's metrics files."""
    out: list[str] = []
    tables = {s: {p.stem: load(p) for p in sorted((root / "metrics/eval" / s).glob("*.json"))}
              for s in ("internal", "external")}
    if not tables["internal"]:
        raise SystemExit(f"no metrics/eval/internal/*.json under {root}: run `make repro` first")
    budgets = sorted({k for t in tables["internal"].values() for k in t},
                     key=lambda k: float(k.split("=")[1]))
    out.append("AUROC, internal / external [95% CI]:")
    for regime in tables["internal"]:
        cells = [f"{b}: {cell(tables['internal'][regime].get(b, {}))} / {cell(tables['external'].get(regime, {}).get(b, {}))}"
                 for b in budgets]
        out.append(f"  {regime:28s} " + " | ".join(cells))

    internal = tables["internal"]
    swin = {r: t for r, t in internal.items() if r in SWIN_REGIMES}
    base = internal.get(BASELINE, {})
    if swin and base:
        for b in budgets:
            best = max(swin, key=lambda r: swin[r].get(b, {}).get("auroc", float("-inf")))
            gap = base[b]["auroc"] - swin[best][b]["auroc"] if b in base and b in swin[best] else float("nan")
            target = "  (target: within 0.03)" if b == "eps=inf" else ""
            out.append(f"{b}: best Swin {best} {swin[best][b]['auroc']:.3f} vs {BASELINE} {base[b]['auroc']:.3f}: "
                       f"{'baseline ahead by' if gap > 0 else 'Swin ahead by'} {abs(gap):.3f}{target}")
    if "eps=6" in budgets and swin:
        above = [r for r in swin if swin[r].get("eps=6", {}).get("auroc_lo", 0) > 0.5]
        out.append(f"eps=6: Swin regimes whose internal CI lies above chance: {', '.join(above) or 'none'}")
    widths = [(t[b]["auroc_hi"] - t[b]["auroc_lo"]) / 2 for t in internal.values() for b in t]
    out.append(f"internal AUROC CI half-width: at most {max(widths):.3f} (target <= 0.05)")
    if "synth" in internal:
        synth = next(iter(internal["synth"].values()))
        out.append(f"synth (trained once) internal AUROC {synth['auroc']:.3f} (target >= 0.75)")

    frd = load(root / "reports/synthesis.json").get("frd", {})
    if frd and not frd.get("skipped"):
        out.extend(frd_lines(frd))
    pre = load(root / "metrics/pretrain.json")
    if pre:
        out.append(f"public pretraining: test AUROC {pre['public_test_auroc']:.3f}, best epoch {pre['best_epoch']}, "
                   f"{pre['seconds']:.0f} s")
    return out


def frd_lines(frd: dict) -> list[str]:
    """FRD real-synth against internal-external (mean and standard error over the subsets),
    overall and per class, with the order `synth_quality.frd_order` reads from them."""
    from mammodp.stages.synth_quality import frd_order

    lines = []
    for cls in ("overall", "benign", "malignant"):
        cells = {pair: frd.get(pair, {}).get(cls, {}) for pair in ("real-synth", "internal-external", "real-real")}
        if not all("mean" in c for c in cells.values()):
            continue
        rs, ie, rr = cells["real-synth"], cells["internal-external"], cells["real-real"]
        order = frd_order(frd, cls)
        verdict = {"below": "below", "above": "NOT below (above)", "level": "NOT below (level within 2 SE)"}[order]
        lines.append(f"FRD {cls}: real-synth {rs['mean']:.1f} (SE {rs.get('se', float('nan')):.1f}) vs "
                     f"internal-external {ie['mean']:.1f} (SE {ie.get('se', float('nan')):.1f}), real-real "
                     f"{rr['mean']:.1f}; {rs['subsets']} subsets of {rs['n_per_side']}: {verdict}"
                     + (" (target: below, the paper's order)" if cls == "overall" else ""))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repro", action="store_true", help="run `dvc repro --force` first and time each stage")
    ap.add_argument("--no-preload", action="store_true",
                    help="with --repro: every stage in a process of its own (not `mammodp preload`, as make repro runs)")
    args = ap.parse_args()
    if args.repro:
        cmd = ["dvc", "repro", "--force"]
        times = time_stages(cmd if args.no_preload else ["mammodp", "preload", "--", *cmd])
        print("\nper-stage wall time (s), process start-up included:")
        for stage, seconds in times.items():
            print(f"  {stage:45s} {seconds:7.1f}")
        print(f"  target: the whole `dvc repro` within 600 s: {'met' if times['(total)'] <= 600 else 'NOT met'}")
    print("\n".join(report(ROOT)))


if __name__ == "__main__":
    main()
