"""Data-parallel DP-SGD: 2 real processes on gloo train exactly what 1 process trains.

Seeded sampling, flips and noise (`reproducible_noise`): the 2-rank union of Poisson batches is the
1-process batch, the noise is drawn once (rank 0) from the same stream, and the all-reduced
clipped sum equals the single sum to float tolerance; the accountant sees the same (q, sigma,
steps). A rank killed mid-run makes the survivor fail with `DistributedError` (no hang), the
last checkpoint stays whole, and resuming from it finishes with the uninterrupted weights.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import socket
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mammodp.data.datasets import PatchTable
from mammodp.errors import DistributedError
from mammodp.privacy.distributed import ShardedPoissonSampler
from mammodp.privacy.sampler import PoissonSampler
from mammodp.training import FitSpec, fit

EPSILONS = (8.0, math.inf)


def _table(n: int, seed: int, size: int = 32) -> PatchTable:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.random((n, 1, size, size), dtype=np.float32) * 0.5 + labels[:, None, None, None] * 0.3
    frame = pd.DataFrame({"patient_id": [f"P{seed}_{i // 2}" for i in range(n)], "label": labels})
    return PatchTable(images=images.astype(np.float32), labels=labels.astype(np.int64), frame=frame)


def _spec(epsilon: float, epochs: int = 2) -> FitSpec:
    return FitSpec(epochs=epochs, lr=0.01, weight_decay=0.0, batch_size=3, physical_batch_size=3,
                   label_smoothing=0.1, flip=True, amp=False, seed=5, epsilon=epsilon, delta=1e-3,
                   max_grad_norm=1.0, accountant="rdp", privacy_unit="patient", grad_chunk=2,
                   per_sample_method="hooks", reproducible_noise=True, synth_ratio=1.0,
                   noise_multiplier=1.0 if math.isfinite(epsilon) else None)  # fixed sigma: no calibration


def _train(epsilon: float, checkpoint: Path | None = None, resume: bool = False, on_epoch=None, dist=None):
    torch.manual_seed(0)
    from mammodp.models.swin import create_classifier

    model = create_classifier("swin_micro", mode="full")
    # SGD: the update is lr x the DP gradient, so equal weights mean equal private gradients
    # (Adam's 1/sqrt(v) would magnify float rounding in near-zero coordinates).
    res = fit(model, _spec(epsilon), private=_table(16, 0), public=_table(8, 1), val=_table(6, 2), device="cpu",
              progress=False, checkpoint=checkpoint, resume=resume, on_epoch=on_epoch, dist=dist,
              optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.05))
    return model, res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, task: str) -> None:
    """One rank, joined through the same torchrun environment variables `setup()` reads."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from mammodp.privacy import distributed

    out_dir = Path(out)
    ctx = distributed.setup("cpu")
    try:
        if task == "equal":
            for eps in EPSILONS:
                model, res = _train(eps)
                torch.save({"state": model.state_dict(), "privacy": res.privacy}, out_dir / f"rank{rank}-{eps}.pt")
        elif task == "kill":
            def die_after_first_epoch(rec):
                if rank == 1 and rec["epoch"] == 0:
                    os.kill(os.getpid(), signal.SIGKILL)  # a rank dying mid-run, no goodbye
            _train(8.0, checkpoint=out_dir / "ck" / "last.pt", on_epoch=die_after_first_epoch)
        elif task == "resume":
            model, res = _train(8.0, checkpoint=out_dir / "ck" / "last.pt", resume=True)
            if rank == 0:
                torch.save({"state": model.state_dict(), "privacy": res.privacy}, out_dir / "resumed.pt")
    except Exception as exc:  # noqa: BLE001 - the test reads what a rank died of
        (out_dir / f"error-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise SystemExit(3) from None
    finally:
        distributed.shutdown()


def _launch(task: str, out: Path, timeout: float = 240) -> list[int | None]:
    """Start 2 ranks; wait for both (kill the rest at the deadline). Returns the exit codes."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(out), task)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _same_state(a: dict, b: dict) -> None:
    for name, t in a.items():
        assert torch.allclose(t, b[name], rtol=1e-4, atol=1e-6), (name, float((t - b[name]).abs().max()))


def test_shards_are_independent_coins_whose_union_is_the_one_process_batch():
    records = np.repeat(np.arange(20), 2)  # 20 records of 2 samples
    single = PoissonSampler(records, 0.3, seed=11)
    state = single.generator.get_state()
    shards = [ShardedPoissonSampler(records, 0.3, rank=r, world_size=3, generator_state=state) for r in range(3)]
    for _ in range(25):
        want = single.sample()
        parts = [s.sample() for s in shards]
        for r, part in enumerate(parts):
            assert set(single.record_of_sample[part] % 3) <= {r}  # a rank samples its shard only
        assert sorted(np.concatenate(parts).tolist()) == sorted(want.tolist())
    assert {s.expected_batch_size for s in shards} == {single.expected_batch_size} == {6.0}
    assert {s.n_records for s in shards} == {20}


@pytest.mark.slow  # 2 spawned ranks + 1 process: ~1-2 min on 2 shared cores
@pytest.mark.timeout(600)
def test_two_ranks_train_exactly_what_one_process_trains(tmp_path):
    codes = _launch("equal", tmp_path)
    assert codes == [0, 0], [p.read_text() for p in tmp_path.glob("error-*.txt")]
    for eps in EPSILONS:
        model, res = _train(eps)
        for rank in (0, 1):
            two = torch.load(tmp_path / f"rank{rank}-{eps}.pt", weights_only=True)
            _same_state(model.state_dict(), two["state"])  # both replicas equal the 1-process model
        # The accountant saw the same mechanism: q, sigma, steps and hence epsilon.
        priv = torch.load(tmp_path / f"rank0-{eps}.pt", weights_only=True)["privacy"]
        for key in ("sample_rate", "noise_multiplier", "steps", "expected_batch_size", "n_records", "accountant"):
            assert priv[key] == res.privacy[key], key
        assert priv["epsilon"] == pytest.approx(res.privacy["epsilon"], rel=1e-12)
        assert math.isfinite(priv["epsilon"]) == math.isfinite(eps)
        assert priv["noise_multiplier"] > 0 or not math.isfinite(eps)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_rank_fails_the_job_cleanly_and_resume_finishes_the_run(tmp_path):
    codes = _launch("kill", tmp_path, timeout=180)
    assert codes[1] == -signal.SIGKILL
    assert codes[0] == 3, "the surviving rank must fail, not hang or succeed"
    error = (tmp_path / "error-0.txt").read_text()
    assert error.startswith("DistributedError") and "rank 0/2" in error
    ck_dir = tmp_path / "ck"
    assert sorted(p.name for p in ck_dir.iterdir()) == ["last.pt"]  # whole checkpoint, no temp file
    from mammodp.checkpoint import read_checkpoint

    ck, _ = read_checkpoint(ck_dir / "last.pt")  # plain data, loads with weights_only=True
    assert ck["epoch"] == 0 and len(ck["ranks"]) == 2
    assert [r["sampler"]["rank"] for r in ck["ranks"]] == [0, 1]

    codes = _launch("resume", tmp_path)
    assert codes == [0, 0], [p.read_text() for p in tmp_path.glob("error-*.txt")]
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    model, res = _train(8.0)  # uninterrupted, one process
    _same_state(model.state_dict(), resumed["state"])
    assert resumed["privacy"]["steps"] == res.privacy["steps"]
    assert resumed["privacy"]["epsilon"] == pytest.approx(res.privacy["epsilon"], rel=1e-12)


def test_resuming_with_another_number_of_ranks_is_refused():
    from mammodp.privacy.distributed import DistContext

    ctx = DistContext(rank=0, world_size=2, local_rank=0, backend="gloo", device=torch.device("cpu"))
    with pytest.raises(DistributedError, match="nproc_per_node"):
        ctx.load_rank_state(None, engine=None, augment=torch.Generator())
