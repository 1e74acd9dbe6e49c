"""Data-parallel DP-SGD across processes (`torchrun`): N workers, one Gaussian mechanism.

`torchrun --nproc_per_node=N -m mammodp train ...` starts N copies of the command with
`RANK`, `WORLD_SIZE`, `LOCAL_RANK` (and the rendezvous address) in their environment.
`setup()` reads them, joins the process group (nccl on CUDA, gloo on CPU) and returns a
`DistContext`; `mammodp.training.fit` then turns its engine data-parallel with
`DistContext.make_data_parallel`. Outside torchrun `setup()` returns None and nothing changes.

One logical DP-SGD step with N ranks (records sharded: record r belongs to rank r mod N):

1. Sampling. Every rank draws the same vector of n_records uniform coins from one shared
   stream (rank 0's sampler state, broadcast once) and keeps the coins of its own shard:
   record r joins the batch iff coin_r < q. So each record's membership is one independent
   Bernoulli(q) draw, made by exactly one rank: the union of the ranks' batches is a Poisson
   batch of the whole data set at rate q -- and, for the same seed, the very batch that one
   process draws.
2. Each rank computes the clipped per-record gradients of its records (the engine's own
   per-sample machinery, so Swin's full-model per-sample gradients work) and sums them: S_k.
3. Noise once, on rank 0: it adds z ~ N(0, sigma^2 C^2 I) to S_0; the other ranks add none.
4. One all-reduce (sum) of the flattened sums (and the batch counts): every rank receives
   sum_k S_k + z = S + z, where S is the clipped sum over the global Poisson batch.
5. Every rank divides by q x n_records, the expected batch size of the WHOLE data set,
   mixes in the public (synthetic) gradient, and steps its optimiser: the replicas stay equal.

Why this is the single-process mechanism: the released quantity, S + z, has the same S and
the same noise distribution as one process's; the local sums S_k never leave the trusted
workers (like the un-noised sum inside one process). Splitting the noise as N(0, sigma^2
C^2 / N) per rank would release the same distribution too (independent Gaussians add their
variances); noise on rank 0 is chosen because then a seeded run draws the very noise of the
1-process run (which the tests check) and one generator holds the secret noise stream.
Accounting: each rank's accountant records (q, sigma) per step, exactly the 1-process
history; only rank 0 reports it.

Checkpoints: the caller gathers every rank's sampler (and augmentation generator) state
with `gather_rank_state` into rank 0's checkpoint; `load_rank_state` gives each rank its own
back. A rank that dies makes the others' next collective fail (gloo: connection closed), or
torchrun's SIGTERM reaches them first: they raise `DistributedError` (run FAILED) or
`Interrupted` (run KILLED, `mammodp.io.raise_on_termination`); either way the stage's atomic
outputs are never renamed into place.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from mammodp.errors import DistributedError
from mammodp.privacy.sampler import PoissonSampler

log = logging.getLogger(__name__)

_ACTIVE: "DistContext | None" = None


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from the torchrun environment, or None outside it.

    Raises:
        DistributedError: the variables are present but inconsistent.
    """
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise DistributedError(f"bad torchrun environment ({exc})", field="WORLD_SIZE") from exc
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise DistributedError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}", field="RANK")
    return rank, world, local


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job and the collectives DP-SGD needs.

    Attributes:
        rank, world_size, local_rank: from torchrun.
        backend: `nccl` (CUDA) or `gloo` (CPU).
        device: this rank's device (`cuda:LOCAL_RANK` on GPU machines).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs to MLflow and writes outputs."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives

    def _call(self, what: str, fn, *args, **kwargs):
        """Run a collective; a lost peer becomes a DistributedError naming this rank."""
        import torch.distributed as dist

        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as exc:  # DistBackendError, gloo "connection closed", timeouts
            _ignore_sigterm()  # already unwinding: torchrun's SIGTERM must not cut the cleanup short
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {what} failed, a rank died or is unreachable ({exc}); "
                "no output was written", field="distributed") from exc

    def reduce_step(self, grads: dict[str, torch.Tensor], stats: Sequence[float]):
        """Sum the ranks' gradient sums and batch counts in one all-reduce.

        Args:
            grads: name -> this rank's (rank 0: noisy) clipped sum, float32 on `device`.
            stats: (samples, records, loss_sum, clipped) of this rank's share of the batch.

        Returns:
            (grads, stats) summed over all ranks, on every rank.
        """
        import torch.distributed as dist

        names = list(grads)
        dev = grads[names[0]].device if names else self.device
        # The counts as they come (host numbers, or the step's device tensors: not read back
        # here; the one read is after the all-reduce).
        tail = [s.detach().reshape(1).to(device=dev, dtype=torch.float32) if isinstance(s, torch.Tensor)
                else torch.full((1,), float(s), dtype=torch.float32, device=dev) for s in stats]
        flat = torch.cat([grads[n].reshape(-1).float() for n in names] + tail)
        self._call("all-reduce of the clipped gradient sum", dist.all_reduce, flat, op=dist.ReduceOp.SUM)
        out, pos = {}, 0
        for n in names:
            size = grads[n].numel()
            out[n] = flat[pos : pos + size].view_as(grads[n])
            pos += size
        samples, records, loss_sum, clipped = flat[pos:].tolist()
        return out, (int(round(samples)), int(round(records)), float(loss_sum), int(round(clipped)))

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src`, on every rank (pickled)."""
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        self._call("broadcast", dist.broadcast_object_list, box, src=src)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._call("all-gather", dist.all_gather_object, out, obj)
        return out

    def broadcast_module(self, model: torch.nn.Module) -> None:
        """Make every rank's weights and buffers rank 0's (the replicas start equal)."""
        import torch.distributed as dist

        for t in list(model.parameters()) + list(model.buffers()):
            self._call("broadcast of the model", dist.broadcast, t.data, src=0)

    def barrier(self) -> None:
        import torch.distributed as dist

        self._call("barrier", dist.barrier)

    # ------------------------------------------------------------------ DP-SGD

    def make_data_parallel(self, engine, seed: int | None = None) -> None:
        """Turn a `DPSGD` engine (built the same way on every rank) data-parallel, in place.

        Its sampler becomes a `ShardedPoissonSampler` continuing rank 0's coin stream (so an
        OS-seeded stream is shared, a seeded one is the 1-process stream); its clipped sum is
        all-reduced each step; only rank 0 adds noise. Augmentation draws need nothing here:
        `fit` draws flips for every sample each step, the same stream on every rank.

        Args:
            engine: the engine of `mammodp.privacy.make_private`.
            seed: unused (kept for callers that pass the run's seed).
        """
        state = self.broadcast_object(engine.sampler.generator.get_state())
        engine.sampler = ShardedPoissonSampler(engine.sampler.record_of_sample, engine.sampler.sample_rate,
                                               rank=self.rank, world_size=self.world_size, generator_state=state)
        engine.reduce = self.reduce_step
        engine.adds_noise = self.is_main

    def gather_rank_state(self, engine, augment: torch.Generator) -> list[dict]:
        """Every rank's sampler and augmentation state (rank order), for rank 0's checkpoint."""
        return self.gather_objects({"rank": self.rank, "sampler": engine.sampler.state_dict(),
                                    "augment": augment.get_state()})

    def load_rank_state(self, ranks: list[dict] | None, engine, augment: torch.Generator) -> None:
        """Give this rank its own sampler and augmentation state back from a checkpoint.

        Raises:
            DistributedError: the checkpoint was written by a job of another size.
        """
        if ranks is None or len(ranks) != self.world_size:
            got = "a single process" if ranks is None else f"{len(ranks)} ranks"
            raise DistributedError(f"the checkpoint was written by {got}, this job has {self.world_size} ranks; "
                                   "resume with the same --nproc_per_node", field="world_size")
        mine = ranks[self.rank]
        engine.sampler.load_state_dict(mine["sampler"])
        augment.set_state(mine["augment"])


class ShardedPoissonSampler(PoissonSampler):
    """Poisson sampling of one rank's shard (records r with r mod N == rank) at the global q.

    Every rank draws the same n_records coins per step from a shared stream and keeps those of
    its shard, so each record's membership is one Bernoulli(q) draw and the union over ranks
    is exactly the batch a `PoissonSampler` with the same stream draws. `n_records`,
    `sample_rate` and `expected_batch_size` stay those of the whole data set.

    Args:
        record_ids: one entry per sample of the WHOLE data set, naming its record.
        sample_rate: q.
        rank, world_size: this rank and the number of ranks.
        generator_state: the shared stream's state (rank 0's, broadcast); None = seed from `seed`.
        seed: seeds the stream when no state is given (None = OS entropy; then the ranks
            would not share it: give a state).
    """

    def __init__(self, record_ids: Sequence[Any] | np.ndarray, sample_rate: float, *, rank: int, world_size: int,
                 generator_state: torch.Tensor | None = None, seed: int | None = None):
        super().__init__(record_ids, sample_rate, seed=seed)
        if not 0 <= rank < world_size:
            raise DistributedError(f"rank {rank} outside world of size {world_size}", field="RANK")
        self.rank, self.world_size = int(rank), int(world_size)
        if generator_state is not None:
            self.generator.set_state(generator_state)
        self.shard_records = np.arange(self.n_records)[np.arange(self.n_records) % self.world_size == self.rank]

    def sample_records(self) -> np.ndarray:
        """This rank's records of one global Poisson batch (ascending; possibly empty)."""
        chosen = super().sample_records()  # the same coins on every rank
        return chosen[chosen % self.world_size == self.rank]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("world_size", 1) != self.world_size:
            raise DistributedError(f"sampler state of a {state.get('world_size', 1)}-rank job, this job has "
                                   f"{self.world_size}", field="world_size")
        super().load_state_dict(state)


# ---------------------------------------------------------------------- process group


def _ignore_sigterm() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def setup(device: str = "auto", timeout_s: float | None = None) -> DistContext | None:
    """Join the torchrun job this process belongs to; None outside torchrun (or a 1-rank job).

    Picks nccl when the device is CUDA (each rank on `cuda:LOCAL_RANK`), gloo on CPU.

    Args:
        device: `auto`, `cpu` or `cuda` (as `train.device`).
        timeout_s: collective timeout; None = torch's default.

    Raises:
        DistributedError: a bad environment or a failed rendezvous.
    """
    global _ACTIVE
    env = torchrun_env()
    if env is None or env[1] == 1:
        return None
    if _ACTIVE is not None:
        return _ACTIVE
    import torch.distributed as dist

    from mammodp.io import raise_on_termination
    from mammodp.runtime import resolve_device

    rank, world, local = env
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    **({"device_id": dev} if backend == "nccl" else {}), **kwargs)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"rank {rank}/{world}: cannot join the process group ({exc})",
                                   field="distributed") from exc
    # torchrun SIGTERMs the surviving ranks when one dies: unwind like Ctrl-C (atomic outputs
    # dropped, the MLflow run ends KILLED) instead of dying mid-write (mammodp.io).
    raise_on_termination()
    _ACTIVE = DistContext(rank=rank, world_size=world, local_rank=local, backend=backend, device=dev)
    log.info("data-parallel DP-SGD: rank %d of %d (%s on %s)", rank, world, backend, dev)
    return _ACTIVE


def active() -> DistContext | None:
    """The context `setup()` joined in this process, or None (single process)."""
    return _ACTIVE


def shutdown() -> None:
    """Leave the process group (end of the command)."""
    global _ACTIVE
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _ACTIVE = None


__all__ = ["DistContext", "ShardedPoissonSampler", "active", "setup", "shutdown", "torchrun_env"]
