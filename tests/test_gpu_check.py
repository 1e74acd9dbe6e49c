"""bench/gpu_check.sh is run only where a GPU is lent (minutes of device time, rarely): every
bench command it runs must work before it gets there. Each is run here on the CPU with the same
flags, sizes scaled down (swin_micro, a few samples, one or two steps or epochs)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"

# flag -> value on the CPU (None: drop the flag and its value)
_SMALL = {"--device": "cpu", "--preset": "swin_micro", "--batch": "4", "--grad-chunk": "4", "--steps": "1",
          "--patients": "100", "--epochs": "2"}


def _commands() -> list[tuple[str, list[str]]]:
    out = []
    for line in SCRIPT.read_text().splitlines():
        m = re.search(r"\$PY (bench/\S+\.py)(.*)$", line)
        if m:
            out.append((m.group(1), shlex.split(m.group(2))))
    return out


def _on_cpu(script: str, args: list[str]) -> list[str]:
    args = list(args)
    for flag, value in _SMALL.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        elif script.endswith("gpu_train_check.py") and flag in ("--device", "--preset", "--epochs"):
            args += [flag, value]
    if script.endswith("dp_overhead.py"):
        args += ["--block", "1"]
    return args


def test_the_gpu_check_names_the_bench_commands_it_is_expected_to():
    scripts = [s for s, _ in _commands()]
    assert scripts.count("bench/dp_overhead.py") == 3 and "bench/gpu_train_check.py" in scripts
    assert "-m gpu" in SCRIPT.read_text()


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args"), _commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_each_gpu_check_command_runs_on_the_cpu_scaled_down(script, args, tmp_path):
    cmd = [sys.executable, str(ROOT / script), *_on_cpu(script, args)]
    if script.endswith("gpu_train_check.py"):
        cmd += ["--out", str(tmp_path / "work")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    if script.endswith("dp_overhead.py"):
        assert "full-model DP (auto: mixed)" in res.stdout
        for route in (args[args.index("--routes") + 1].split(",") if "--routes" in args else []):
            assert route == "auto" or f"full-model DP ({route} route)" in res.stdout, route


def test_the_gpu_check_stops_at_once_without_cuda():
    """Without CUDA every GPU test skips (pytest would call that a pass) and every benchmark
    fails: the check says so and stops before spending a device session's minutes."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHON": sys.executable, "HOME": "/tmp"}
    res = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "CUDA is not available" in res.stderr and "==" not in res.stdout
