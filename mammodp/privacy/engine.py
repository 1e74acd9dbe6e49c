"""DP-SGD for any model: the one entry point that makes training private.

`make_private(model, optimizer, ...)` returns a `DPSGD` engine that owns the Poisson
sampler, the accountant and the noise generator. Per logical step the caller asks for a
batch (`sample_batch`) and hands its tensors to `step`, which

1. splits the batch into physical chunks that never cut a record in two,
2. clips each record's gradient (summed over its samples) to norm C over all trainable
   parameters and sums the clipped gradients -- by default (`auto`) with mixed ghost
   clipping (module `ghost`: one batched forward/backward, per-record norms from T x T
   Gram products or materialised, per layer, the sum by book-keeping; checked once per
   run against the `torch.func` vmap reference), else with vmap --, accumulating in
   place into one flat buffer kept for the run,
3. adds Gaussian noise N(0, sigma^2 C^2) once,
4. divides by the EXPECTED batch size q x N (records), not the realised Poisson count,
5. optionally mixes in the plain mean gradient of PUBLIC samples (synthetic data: not
   records, never clipped, never counted by the accountant),
6. writes `.grad` of every trainable parameter and records the step in the accountant
   (`.grad` may be views of one buffer kept for the run and rewritten in place every
   step: clone a gradient you want to keep past the next step).

The caller then calls `optimizer.step()` (any optimiser: its update is post-processing).

With `target_epsilon=inf` (and no noise multiplier) the same engine runs non-privately:
same sampler, loop shape, precision and public mixing, no clipping, no noise, gradient =
loss-gradient sum / expected batch size (the private mode's estimator), nothing accounted;
`summary()["epsilon"]` is inf. A private step with sigma = 0 and C = inf equals it exactly.

Checkpoints: `state_dict()` holds the accountant history, the sampler's RNG state and
(only with a seeded, reproducible noise generator) the noise RNG state. Treat it like
the training data: it reveals which records past batches held.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from mammodp.errors import PrivacyError
from mammodp.privacy.per_sample import (
    LossFn,
    clip_factors,
    clipped_grad_sum,
    make_route,
    per_sample_gradients,
    record_norms,
    resolve_method,
    trainable_named_parameters,
)
from mammodp.privacy.sampler import PoissonSampler, split_physical, steps_per_epoch
from mammodp.runtime import to_device

if TYPE_CHECKING:  # the accountants (Opacus) are imported by private engines only
    from mammodp.privacy.accountant import PrivacyAccountant

log = logging.getLogger(__name__)

PRIVACY_UNITS = ("patch", "patient")


class _OnDemand(dict):
    """The run's clipped-sum views (name -> view of one flat buffer); `ready()` makes the
    buffer's memory and zeroes it when a route first writes (`per_sample.ready`)."""

    __slots__ = ("ready",)


def _release(t: torch.Tensor | None) -> None:
    """Give a run buffer's memory back; its views stay (metadata) until `_regrow`. A buffer
    whose storage cannot be resized (a CPU tensor that `.numpy()` has shared with numpy,
    say) keeps its memory: nothing else changes."""
    if t is not None:
        storage = t.untyped_storage()
        if storage.nbytes() and storage.resizable():
            storage.resize_(0)


def _regrow(t: torch.Tensor) -> bool:
    """Memory for a released run buffer again (its views valid again); True if it had none."""
    storage = t.untyped_storage()
    if storage.nbytes():
        return False
    storage.resize_(t.numel() * t.element_size())
    return True


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (inf for NaN)."""
    err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    return err if math.isfinite(err) else math.inf


class DPSGD:
    """A private training step over Poisson batches; build it with `make_private`.

    Attributes:
        model, optimizer: as passed to `make_private`.
        sampler: the `PoissonSampler` over records.
        accountant: the `PrivacyAccountant` (None when non-private).
        private: False for the non-private (epsilon = inf) mode.
        noise_multiplier: sigma (0 when non-private).
        sample_rate: q = expected_batch_size / number of records.
        expected_batch_size: q x records: the divisor of the noisy gradient sum.
        max_grad_norm: clipping norm C per record.
        delta, privacy_unit, target_epsilon.
        steps_per_epoch: round(1 / q); total_steps: epochs x steps_per_epoch.
        steps_taken: logical steps done (including resumed ones).
        per_sample_method: `mixed`, `ghost`, `hooks` or `vmap` (the route in use);
            method_note: why `auto` fell back to vmap, if it did.
        last_stats: counts and clipping rate of the last step (the clipped count is read from
            the device when this is first read, not during the step).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        sampler: PoissonSampler,
        accountant: PrivacyAccountant | None,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float,
        privacy_unit: str,
        target_epsilon: float | None,
        total_steps: int,
        grad_chunk: int,
        physical_batch_size: int,
        noise_seed: int | None,
        autocast_dtype: torch.dtype | None,
        per_sample_method: str = "auto",
    ):
        self.model = model
        self.optimizer = optimizer
        self.sampler = sampler
        self.accountant = accountant
        self.private = accountant is not None
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.delta = float(delta)
        self.privacy_unit = privacy_unit
        self.target_epsilon = target_epsilon
        self.total_steps = int(total_steps)
        self.grad_chunk = int(grad_chunk)
        self.physical_batch_size = int(physical_batch_size)
        self.autocast_dtype = autocast_dtype
        self.requested_method = per_sample_method
        try:
            self.per_sample_method = resolve_method(model, per_sample_method)
        except ValueError as exc:
            raise PrivacyError(str(exc), field="per_sample_method") from exc
        # `auto` chose a hook-based route: check it once against vmap on real inputs before trusting it.
        self._verify_route = per_sample_method == "auto" and self.per_sample_method != "vmap"
        self.method_note = ""
        self._route = None  # (method, loss_fn, route object): built once, reused every step
        # All clipped sums, fp32, one flat buffer: made when the step's clipping first writes
        # and released when the step has turned it into the noisy gradient (off the memory peak
        # of the forward / backward, which for head-only DP is the frozen backbone's forward).
        self._flat: torch.Tensor | None = None
        self._sums = _OnDemand()  # per-parameter views of it
        self._sums.ready = self._ready_sums
        self._sums_zeroed = False  # in this step
        self._sizes: list[int] = []  # numel of each parameter, in the buffer's order
        # The noisy mean gradient; its views are `.grad`. Released when a step begins and no
        # parameter's `.grad` holds its view any longer (zero_grad(set_to_none=True)).
        self._grad_flat: torch.Tensor | None = None
        self._grad_views: dict[str, torch.Tensor] = {}
        self.steps_taken = 0
        self._last: tuple | None = None  # (samples, records, clipped: int or device tensor) of the last step
        self._last_stats: dict[str, float] = {}
        self._params = trainable_named_parameters(model)
        device = next(iter(self._params.values())).device
        self.noise_seed = noise_seed
        self.noise_generator = torch.Generator(device=device)
        if noise_seed is None:
            self.noise_generator.seed()  # OS entropy: noise nobody can replay
        else:
            self.noise_generator.manual_seed(int(noise_seed))
        self._pending: np.ndarray | None = None  # sample indices handed out by sample_batch()
        # Data-parallel seam (mammodp.privacy.distributed): `reduce(grads, stats)` sums the ranks'
        # gradient sums and batch counts after the noise; only the rank with `adds_noise` adds it.
        self.reduce = None
        self.adds_noise = True

    # ------------------------------------------------------------------ properties

    @property
    def last_stats(self) -> dict[str, float]:
        """{samples, records, clipped_fraction} of the last step. The clipped count stays on the
        device during the step (reading it would make the host wait for the step's kernels):
        it is read here, once, when asked."""
        if self._last is not None:
            n_samples, n_records, clipped = self._last
            self._last = None
            self._last_stats = {"samples": n_samples, "records": n_records,
                                "clipped_fraction": int(clipped) / n_records if n_records else 0.0}
        return self._last_stats

    @property
    def sample_rate(self) -> float:
        """Poisson sampling rate q."""
        return self.sampler.sample_rate

    @property
    def expected_batch_size(self) -> float:
        """q x number of records."""
        return self.sampler.expected_batch_size

    @property
    def steps_per_epoch(self) -> int:
        """round(1 / q)."""
        return self.sampler.steps_per_epoch

    # ------------------------------------------------------------------ the step

    def sample_batch(self) -> torch.Tensor:
        """Sample indices (int64, CPU) of the next Poisson batch; may be empty.

        All samples of every chosen record, grouped by record. Pass them to `step` as
        `record_idx` together with the tensors they select.
        """
        idx = self.sampler.sample()
        self._pending = idx
        return torch.from_numpy(idx)

    def step(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFn,
        *,
        record_idx: torch.Tensor | np.ndarray,
        public: tuple[torch.Tensor, torch.Tensor] | None = None,
        public_weight: float | None = None,
    ) -> torch.Tensor:
        """One logical step: write the private (noisy, clipped) gradient into `.grad`.

        Args:
            inputs: (B, 1, H, W) samples of the batch from `sample_batch` (any device;
                moved to the model's device one physical chunk at a time).
            targets: (B,) labels.
            loss_fn: mean loss over a batch, e.g. `nn.CrossEntropyLoss(label_smoothing=0.1)`.
            record_idx: the indices `sample_batch` returned for this batch (B,).
            public: optional (x (M, 1, H, W), y (M,)) public samples (synthetic): their plain
                mean gradient is mixed in; they are not records and cost no privacy.
            public_weight: w in g = (1 - w) g_private + w g_public. Default M / (E + M)
                with E the expected private batch size (in both modes):
                each public sample weighs like one expected private record.

        Returns:
            Mean loss over the private samples (NaN for an empty batch without public data;
            the public samples' mean loss when only they are present), as a detached 0-d
            float32 tensor on the model's device. The step itself never waits for the device:
            reading the loss (`float()`, `.item()`) or `last_stats` does; a loop that reads
            neither until the epoch ends lets the host queue the next step meanwhile (CUDA).

        Raises:
            PrivacyError: `record_idx` is not the batch `sample_batch` handed out.
        """
        idx = np.asarray(record_idx.cpu() if isinstance(record_idx, torch.Tensor) else record_idx, dtype=np.int64)
        self._check_batch(idx, inputs, targets)
        device = next(iter(self._params.values())).device
        records = torch.from_numpy(self.sampler.record_of_sample[idx])  # (B,) record of each sample

        if self.private:
            if self._grad_flat is not None and not any(self._holds_grad(p) for p in self._params.values()):
                _release(self._grad_flat)  # nobody holds last step's gradient: not on this step's peak
            try:
                priv, n_samples, n_records, loss_sum, clipped = self._private_sum(
                    inputs, targets, loss_fn, records, device)
            except BaseException:
                if self._grad_flat is not None:  # a reference the caller kept must not point at nothing
                    _regrow(self._grad_flat)
                raise
            stats = (n_samples, n_records, loss_sum, clipped)
            if self.reduce is None:
                grads = self._noisy_mean(priv, self.expected_batch_size)
            else:  # data-parallel: (S_r + z on the noising rank), summed over ranks, then divided
                # A copy: the reduce hook must not rebind the run's cached views (later steps
                # would then hand out this step's gradient).
                noisy = dict(self._noisy_mean(priv, 1.0, add_noise=self.adds_noise))
                noisy, stats = self.reduce(noisy, stats)
                grads = {n: g / self.expected_batch_size for n, g in noisy.items()}
            _release(self._flat)  # the clipped sums are in the noisy gradient now
            n_samples, n_records, loss_sum, clipped = stats
            divisor = self.expected_batch_size
        else:
            priv, n_samples, loss_sum = self._plain_sum(inputs, targets, loss_fn, device, self.physical_batch_size)
            n_records, clipped = int(np.unique(self.sampler.record_of_sample[idx]).size), 0
            # The same estimator as the private mode (sum / expected batch size), so that a
            # private step with zero noise and no clipping equals this one exactly.
            divisor = self.expected_batch_size
            if self.reduce is not None:  # data-parallel: the ranks' plain sums, summed
                priv, (n_samples, n_records, loss_sum, clipped) = self.reduce(
                    priv, (n_samples, n_records, loss_sum, clipped))
            grads = {n: g / divisor for n, g in priv.items()}

        pub_loss = math.nan
        if public is not None and public[0].shape[0] > 0:
            m = public[0].shape[0]
            # Default: each public sample weighs like one (expected) private record.
            w = public_weight if public_weight is not None else m / (divisor + m)
            if not 0.0 <= w <= 1.0:
                raise PrivacyError(f"public_weight must be in [0, 1], got {w}", field="public_weight")
            pub, _, pub_sum = self._plain_sum(public[0], public[1], loss_fn, device, self.physical_batch_size)
            grads = {n: (1.0 - w) * g + w * pub[n] / m for n, g in grads.items()}
            pub_loss = pub_sum / m
        dev_loss = _loss_tensor(loss_sum / n_samples if n_samples else pub_loss, device)

        for name, p in self._params.items():
            g = grads[name]
            if g.dtype != p.dtype:
                p.grad = g.to(p.dtype)
            elif p.grad is not g:  # already the buffer's view when the caller zeroed without set_to_none
                p.grad = g
        if self.private:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps_taken += 1
        self._pending = None
        self._last = (n_samples, n_records, clipped)
        return dev_loss

    def _noisy_mean(self, sums: dict[str, torch.Tensor], divisor: float,
                    add_noise: bool = True) -> dict[str, torch.Tensor]:
        """(clipped sum + N(0, sigma^2 C^2)) / divisor for every parameter, written into the
        run's flat gradient buffer, whose per-parameter views become `.grad`: the noise is
        drawn straight into it (one draw per coordinate per step), then the sum is added and
        the result divided, in place. The buffer and its views are made once per run (81 views
        a step cost ~0.2 ms at swin_micro); its memory is given back while a step computes
        its clipped sums when no parameter's `.grad` holds it (see `step`). A reference to a
        `.grad` kept past the next step therefore sees that step's gradient once the step
        returns (as before), and must not be used from inside the step (a hook)."""
        std = self.noise_multiplier * self.max_grad_norm if add_noise else 0.0
        gen = self.noise_generator
        flat = self._flat
        if self._grad_flat is None:
            self._grad_flat = torch.empty_like(flat)
            pieces = self._grad_flat.split(self._sizes)
            self._grad_views = {name: piece.view(sums[name].shape) for name, piece in zip(sums, pieces)}
        else:
            _regrow(self._grad_flat)  # overwritten below: no zeroing needed
        out = self._grad_flat
        if std > 0 and flat.device == gen.device:
            out.normal_(0.0, std, generator=gen).add_(flat)
        elif std > 0:
            out.copy_(torch.empty_like(flat, device=gen.device).normal_(0.0, std, generator=gen)).add_(flat)
        else:
            out.copy_(flat)
        out.div_(divisor)
        return self._grad_views

    def _check_batch(self, idx: np.ndarray, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self._pending is None:
            raise PrivacyError("step() needs a batch from sample_batch() first (one batch per step)",
                               field="record_idx")
        if idx.shape != self._pending.shape or not (
                np.array_equal(idx, self._pending) or np.array_equal(np.sort(idx), np.sort(self._pending))):
            # Privacy accounting assumes Poisson batches: any other batch breaks the guarantee.
            raise PrivacyError("record_idx is not the batch sample_batch() returned", field="record_idx")
        if inputs.shape[0] != idx.size or targets.shape[0] != idx.size:
            raise PrivacyError(
                f"inputs ({inputs.shape[0]}) and targets ({targets.shape[0]}) must match record_idx ({idx.size})",
                field="record_idx")

    def _route_for(self, loss_fn: LossFn):
        """The run's route object, built once per run (and loss function) and reused."""
        cached = self._route
        if cached is not None and cached[0] == self.per_sample_method and cached[1] is loss_fn:
            return cached[2]
        route = make_route(self.model, loss_fn, self.autocast_dtype, self.per_sample_method)
        self._route = (self.per_sample_method, loss_fn, route)
        return route

    def _check_route(self, x: torch.Tensor, y: torch.Tensor, records: torch.Tensor, loss_fn: LossFn) -> None:
        """Once per run (method `auto`): the chosen route's per-record norms and clipped sum
        must equal those from vmap's per-record gradients on a few real samples (fp32, a
        clipping norm that clips some records and not others), else the run uses vmap and
        the summary says why."""
        self._verify_route = False
        method = self.per_sample_method
        x, y, r = x[:4], y[:4], records[:4]
        ref, _ = per_sample_gradients(self.model, loss_fn, x, y, record_ids=r, method="vmap")
        ref_norms = record_norms(ref)
        c = float(ref_norms.median())
        c = c if math.isfinite(c) and c > 0 else 1.0
        factors = clip_factors(ref_norms, c)
        expected = {n: torch.einsum("r,r...->...", factors, g) for n, g in ref.items()}
        problem = ""
        try:
            got = clipped_grad_sum(self.model, loss_fn, x, y, max_grad_norm=c, record_ids=r,
                                   grad_chunk=self.grad_chunk, route=make_route(self.model, loss_fn, None, method))
        except torch.cuda.OutOfMemoryError:
            # A device out of memory on 4 samples is the run's problem, not the route's: vmap
            # (a per-record gradient each) would need more, at minutes a step. The check is
            # still owed (a caller that frees memory and steps again gets it).
            self._verify_route = True
            raise
        except Exception as exc:  # noqa: BLE001 -- any failure of the unchecked route means: use vmap
            problem = f"{method} failed ({type(exc).__name__}: {exc})"
        if not problem:
            errs = {"the per-record norms": _rel_err(got.norms, ref_norms)}
            errs.update({name: _rel_err(got.grads[name], e) for name, e in expected.items()})
            where, worst = max(errs.items(), key=lambda kv: kv[1])
            if not worst < 1e-3:
                problem = f"{method} disagreed with vmap (relative error {worst:.3g} in {where})"
        if problem:
            self.per_sample_method = "vmap"
            self._route = None
            self.method_note = problem + "; using vmap"
            log.warning("per-sample gradients: %s", self.method_note)

    def _buffers(self) -> dict[str, torch.Tensor]:
        """The run's fp32 clipped-sum buffers: views of one flat tensor, made on the first step
        and kept (the routes cache them), with no memory until the step's clipping first writes
        (`_ready_sums`): whatever an interrupted step left is dropped here."""
        if self._flat is None:
            sizes = [p.numel() for p in self._params.values()]
            first = next(iter(self._params.values()))
            self._flat = torch.empty(sum(sizes), dtype=torch.float32, device=first.device)
            start = 0
            self._sizes = sizes
            for (name, p), size in zip(self._params.items(), sizes):
                self._sums[name] = self._flat[start : start + size].view(p.shape)
                start += size
        _release(self._flat)
        self._sums_zeroed = False
        return self._sums

    def _ready_sums(self) -> None:
        """Memory for the clipped sums, zeroed: once a step, when a route first writes."""
        if not self._sums_zeroed:
            _regrow(self._flat)
            self._flat.zero_()
            self._sums_zeroed = True

    def _holds_grad(self, p: torch.Tensor) -> bool:
        """Whether `p.grad` is (a view of) the run's gradient buffer."""
        g = p.grad
        return g is not None and g.untyped_storage().data_ptr() == self._grad_flat.untyped_storage().data_ptr()

    def _private_sum(self, inputs, targets, loss_fn, records, device):
        """Sum of per-record clipped gradients over physical chunks that keep records whole,
        accumulated in place into the run's buffers."""
        total = self._buffers()
        n_samples = n_records = 0
        clipped = loss_sum = 0  # device tensors once added to: no host sync in the step
        n = inputs.shape[0]
        # A batch that fits one physical chunk is that chunk as it is (clipped_grad_sum groups
        # records itself): no split, no gather copy.
        chunks = [None] if 0 < n <= self.physical_batch_size else split_physical(records.numpy(),
                                                                                self.physical_batch_size)
        one_each = self.sampler.one_per_record  # each sample its own record: nothing to group
        for pos in chunks:
            if pos is None:
                x, y, rec = inputs, targets, records
            else:
                pos_t = torch.from_numpy(pos)  # moved without waiting for the device (runtime.to_device)
                x = inputs[to_device(pos_t, inputs.device)]
                y = targets[to_device(pos_t, targets.device)]
                rec = records[pos_t]
            x = to_device(x, device)
            y = to_device(y, device)
            if self._verify_route:
                self._check_route(x, y, rec, loss_fn)
            res = clipped_grad_sum(self.model, loss_fn, x, y, max_grad_norm=self.max_grad_norm,
                                   record_ids=None if one_each else rec, grad_chunk=self.grad_chunk,
                                   route=self._route_for(loss_fn), out=total)
            n_samples += res.n_samples
            n_records += res.n_records
            clipped = clipped + (res.norms > self.max_grad_norm).sum()
            loss_sum = loss_sum + res.loss_sum
        total.ready()  # zeros if no record was drawn (Poisson batches may be empty)
        return total, n_samples, n_records, loss_sum, clipped

    def _plain_sum(self, inputs, targets, loss_fn, device, chunk):
        """Sum over samples of ordinary loss gradients (batched autograd, no clipping)."""
        total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self._params.items()}
        names, params = list(self._params), list(self._params.values())
        loss_sum, n = 0, inputs.shape[0]
        for s in range(0, n, chunk):
            x = to_device(inputs[s : s + chunk], device)
            y = to_device(targets[s : s + chunk], device)
            ctx = (torch.autocast(device_type=device.type, dtype=self.autocast_dtype)
                   if self.autocast_dtype is not None else contextlib.nullcontext())
            with ctx:
                logits = self.model(x)
            loss = loss_fn(logits.float(), y) * x.shape[0]  # mean -> sum over the chunk
            for name, g in zip(names, torch.autograd.grad(loss, params)):
                total[name] += g.float()
            loss_sum = loss_sum + loss.detach()  # on the device: no host sync
        return total, n, loss_sum

    # ------------------------------------------------------------------ reporting

    def epsilon_spent(self) -> float:
        """Epsilon at `delta` after the steps taken so far (inf when non-private)."""
        if not self.private:
            return math.inf
        return self.accountant.epsilon(self.delta)

    def summary(self) -> dict[str, Any]:
        """The privacy record of the run: everything epsilon means, in one flat dict."""
        eps = self.epsilon_spent()
        acc = self.accountant
        return {
            "epsilon": eps,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon if self.target_epsilon is not None else math.nan,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch_size,
            "steps": self.steps_taken,
            "total_steps": self.total_steps,
            "max_grad_norm": self.max_grad_norm,
            "accountant": acc.mechanism if acc is not None else "none",
            "accountant_requested": acc.requested if acc is not None else "none",
            "accountant_fallback": bool(acc is not None and acc.fallback_reason),
            "accountant_fallback_reason": (acc.fallback_reason or "") if acc is not None else "",
            "privacy_unit": self.privacy_unit,
            "n_records": self.sampler.n_records,
            "n_samples": self.sampler.n_samples,
            "noise_seeded": self.noise_seed is not None,
            "private": self.private,
            "per_sample_method": self.per_sample_method,
            "per_sample_method_note": self.method_note,
        }

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Accountant history, sampler RNG, steps and (if seeded) the noise RNG state."""
        return {
            "version": 1,
            "steps_taken": self.steps_taken,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.max_grad_norm,
            "privacy_unit": self.privacy_unit,
            "private": self.private,
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
            "sampler": self.sampler.state_dict(),
            # An OS-seeded noise stream is not saved: nobody (not even a checkpoint reader)
            # should be able to replay it. A resumed run draws fresh noise then.
            "noise_generator": self.noise_generator.get_state() if self.noise_seed is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run from `state_dict()`.

        Raises:
            PrivacyError: the checkpoint was made with other privacy settings.
        """
        for key in ("noise_multiplier", "sample_rate", "max_grad_norm", "privacy_unit", "private"):
            if state[key] != getattr(self, key):
                raise PrivacyError(f"checkpoint has {key}={state[key]!r}, this run {getattr(self, key)!r}; "
                                   "resume with the same privacy settings", field=key)
        self.steps_taken = int(state["steps_taken"])
        if self.accountant is not None:
            self.accountant.load_state_dict(state["accountant"])
        self.sampler.load_state_dict(state["sampler"])
        if state["noise_generator"] is not None and self.noise_seed is not None:
            self.noise_generator.set_state(state["noise_generator"])
        self._pending = None


def _loss_tensor(value, device: torch.device) -> torch.Tensor:
    """A step's loss as a detached 0-d float32 tensor on `device` (a Python number or NaN too)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32)
    return torch.full((), float(value), dtype=torch.float32, device=device)  # a fill, not a host copy


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    record_ids: Sequence[Any] | np.ndarray,
    expected_batch_size: float,
    delta: float,
    epochs: int,
    max_grad_norm: float,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    accountant: str = "prv",
    privacy_unit: str = "patch",
    noise_seed: int | None = None,
    sampler_seed: int | None = None,
    grad_chunk: int = 32,
    physical_batch_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
    per_sample_method: str = "auto",
) -> DPSGD:
    """Make training of `model` with `optimizer` differentially private (DP-SGD).

    Move the model to its device before calling this (the noise generator lives there).

    Args:
        model: the classifier; its trainable parameters (requires_grad) are privatised.
        optimizer: optimiser over (a subset of) the model's trainable parameters.
        record_ids: one entry per training sample naming its privacy record: the sample
            itself for the unit `patch` (must then be distinct), the patient for `patient`.
        expected_batch_size: expected RECORDS per logical batch; q = this / number of records.
        delta: target delta.
        epochs: planned epochs; total steps = epochs x round(1 / q) (used to calibrate sigma).
        max_grad_norm: clipping norm C of a record's gradient (`math.inf`: no clipping).
        target_epsilon: budget to calibrate sigma to; `math.inf` (with no noise_multiplier)
            = non-private mode.
        noise_multiplier: fixed sigma (e.g. from tuning); overrides calibration. The
            accountant still reports the epsilon it gives.
        accountant: `prv` (falls back to `rdp` on failure, recorded) or `rdp`.
        privacy_unit: `patch` or `patient`.
        noise_seed: seed for the noise generator (reproducible runs only: a known noise
            stream voids the guarantee); None = OS entropy.
        sampler_seed: seed for Poisson sampling; None = OS entropy.
        grad_chunk: samples per vmap call (bounds per-sample-gradient memory).
        physical_batch_size: most samples moved to the device / pushed through at once.
        autocast_dtype: e.g. torch.bfloat16 for mixed precision on CUDA; None = fp32.
        per_sample_method: `auto` (`mixed` where the model supports the hook-based
            routes, checked once against vmap on the first batch; else vmap), `mixed`
            (mixed ghost clipping with book-keeping: no materialised per-sample gradients
            where ghost norms are cheaper), `ghost` (ghost norms for every Linear),
            `hooks` (hook-based, all per-sample gradients materialised) or `vmap`
            (torch.func: any model, slower). Only `auto` is checked.

    Returns:
        The engine.

    Raises:
        PrivacyError: inconsistent settings or a budget that cannot be met.
        ConfigError: unknown accountant.
    """
    if privacy_unit not in PRIVACY_UNITS:
        raise PrivacyError(f"unknown privacy unit {privacy_unit!r}; known: {', '.join(PRIVACY_UNITS)}",
                           field="dp.privacy_unit")
    params = trainable_named_parameters(model)
    if not params:
        raise PrivacyError("the model has no trainable parameters", field="model.mode")
    trainable_ids = {id(p) for p in params.values()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in trainable_ids:
                raise PrivacyError("the optimiser holds parameters that are not trainable parameters of the "
                                   "model; they would be updated outside DP-SGD", field="optimizer")
    ids = np.asarray(record_ids)
    if privacy_unit == "patch" and np.unique(ids).size != ids.size:
        raise PrivacyError("privacy unit 'patch' needs one distinct record id per sample", field="record_ids")
    if not (0 < delta < 1):
        raise PrivacyError(f"delta must be in (0, 1), got {delta}", field="dp.delta")
    if not max_grad_norm > 0:
        raise PrivacyError(f"max_grad_norm must be > 0, got {max_grad_norm}", field="dp.max_grad_norm")
    if epochs < 1 or grad_chunk < 1 or physical_batch_size < 1:
        raise PrivacyError("epochs, grad_chunk and physical_batch_size must be >= 1", field="train")
    n_records = int(np.unique(ids).size)
    if not 0 < expected_batch_size <= n_records:
        raise PrivacyError(f"expected batch size {expected_batch_size} must be in (0, {n_records}] "
                           f"(the number of {privacy_unit} records)", field="train.batch_size")
    sample_rate = expected_batch_size / n_records
    total_steps = epochs * steps_per_epoch(sample_rate)
    sampler = PoissonSampler(ids, sample_rate, seed=sampler_seed)

    private = noise_multiplier is not None or (target_epsilon is not None and math.isfinite(target_epsilon))
    if target_epsilon is None and noise_multiplier is None:
        raise PrivacyError("give target_epsilon (inf = non-private) or noise_multiplier", field="epsilon")
    acc: PrivacyAccountant | None = None
    sigma = 0.0
    if private:
        from mammodp.privacy.accountant import calibrate_noise, make_accountant

        acc = make_accountant(accountant)
        if noise_multiplier is not None:
            if noise_multiplier < 0:
                raise PrivacyError(f"noise multiplier must be >= 0, got {noise_multiplier}", field="noise_multiplier")
            sigma = float(noise_multiplier)
        else:
            sigma = calibrate_noise(target_epsilon, delta, sample_rate, total_steps, acc)
        if delta > 1.0 / n_records:
            log.warning("delta=%g exceeds 1/records=%g: the guarantee is weak", delta, 1.0 / n_records)
        if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "") not in ("", "0"):
            # cuBLAS then uses TF32 whatever `per_sample.exact_arithmetic` asks: a record's norm and
            # what it adds are rounded differently (10-bit inputs), so C bounds it only approximately.
            log.warning("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE is set: CUDA float32 products use TF32 and the "
                        "clipping bound C holds only up to TF32 rounding; unset it for exact clipping")
        log.info("DP-SGD: %d %s records, q=%.4g, sigma=%.4g, C=%g, %d steps, accountant %s%s",
                 n_records, privacy_unit, sample_rate, sigma, max_grad_norm, total_steps, acc.mechanism,
                 f" ({acc.fallback_reason})" if acc.fallback_reason else "")
    return DPSGD(
        model, optimizer, sampler=sampler, accountant=acc, noise_multiplier=sigma, max_grad_norm=max_grad_norm,
        delta=delta, privacy_unit=privacy_unit, target_epsilon=target_epsilon, total_steps=total_steps,
        grad_chunk=grad_chunk, physical_batch_size=physical_batch_size, noise_seed=noise_seed,
        autocast_dtype=autocast_dtype, per_sample_method=per_sample_method,
    )


__all__ = ["DPSGD", "PRIVACY_UNITS", "make_private"]
