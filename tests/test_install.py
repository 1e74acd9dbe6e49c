"""The install path of a fresh machine: a new Python 3.11 venv (setuptools 65, no `wheel`),
pip's cache off, and a --no-build-isolation build of a setuptools sdist, as the Makefile
does for pyradiomics. It failed with "invalid command 'bdist_wheel'" before the Makefile
installed its BUILD_TOOLS first (CI passed only because pip's wheel cache hid it)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_INDEX = Path("/opt/pypi/simple")  # this workplace's local package mirror (no network in tests)

pytestmark = pytest.mark.slow


def _pip(venv: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.skipif(not LOCAL_INDEX.is_dir(), reason="needs the local package index (no network in tests)")
def test_fresh_venv_builds_a_no_isolation_sdist_only_with_the_makefile_build_tools(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_INDEX_URL": LOCAL_INDEX.as_uri(), "PIP_EXTRA_INDEX_URL": "",
           "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    probe = subprocess.run([str(venv / "bin/python"), "-c", "import wheel"], capture_output=True)
    assert probe.returncode != 0, "a fresh venv is expected to lack `wheel` (the case this guards)"

    sdist = tmp_path / "needs_bdist"
    sdist.mkdir()
    (sdist / "setup.py").write_text("from setuptools import setup\nsetup(name='needs-bdist', version='0.1', "
                                    "py_modules=['needs_bdist'])\n")
    (sdist / "needs_bdist.py").write_text("X = 1\n")
    args = ("install", "--no-build-isolation", "--no-index", str(sdist))

    before = _pip(venv, *args, env=env)
    assert before.returncode != 0 and "bdist_wheel" in before.stdout + before.stderr, before.stdout[-2000:]

    line = next(ln for ln in (ROOT / "Makefile").read_text().splitlines() if ln.startswith("BUILD_TOOLS :="))
    tools = shlex.split(line.split(":=", 1)[1])
    assert any(re.match(r"setuptools>=70\.1|wheel", t) for t in tools)
    got = _pip(venv, "install", *tools, env=env)
    assert got.returncode == 0, got.stderr[-2000:]
    after = _pip(venv, *args, env=env)
    assert after.returncode == 0, after.stdout[-2000:] + after.stderr[-2000:]


def test_ci_runs_with_pips_cache_off():
    text = (ROOT / ".ci/run").read_text()
    assert re.search(r"^export PIP_NO_CACHE_DIR=1$", text, re.M) and "make test" in text
