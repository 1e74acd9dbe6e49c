"""Opacus (the accountants, ~2 s to import) is loaded by private engines only.

Every DVC stage is its own process; the non-private ones (public pretraining, the inf cells,
evaluation, synthesis) and the model server should not pay for it.
"""

import subprocess
import sys
import textwrap


def _opacus_loaded(code: str) -> bool:
    script = textwrap.dedent(code) + "\nimport sys\nprint('opacus' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1] == "True"


NON_PRIVATE = """
import numpy as np, torch
from mammodp.privacy import make_private
import mammodp.privacy.compose, mammodp.training
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
dp = make_private(model, opt, record_ids=np.arange(16), expected_batch_size=4, epochs=1,
                  target_epsilon=float("inf"), delta=1e-4, max_grad_norm=1.0)
assert not dp.private
"""


def test_non_private_engine_and_compose_do_not_import_opacus():
    assert not _opacus_loaded(NON_PRIVATE)


def test_private_engine_does_import_it():
    assert _opacus_loaded(NON_PRIVATE.replace('float("inf")', "6.0").replace("assert not dp.private", "assert dp.private"))


def test_package_names_still_resolve():
    assert _opacus_loaded("from mammodp.privacy import ACCOUNTANTS, calibrate_noise\nassert 'prv' in ACCOUNTANTS")
    assert not _opacus_loaded("import mammodp.privacy as p\nassert callable(p.steps_per_epoch)")
