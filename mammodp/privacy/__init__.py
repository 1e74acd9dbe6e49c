"""mammodp.privacy: DP-SGD for models Opacus cannot wrap (Swin), with Opacus' accountants.

One entry point, `make_private(model, optimizer, ...)` -> `DPSGD` (module `engine`).
Building blocks: `per_sample` (per-sample / per-record gradients and clipping, vmap
route), `grad_sampler` (one batched forward/backward with per-layer hooks; the `hooks`
route), `ghost` (mixed ghost clipping with book-keeping: the default `mixed` route),
`sampler` (Poisson sampling, physical chunks), `accountant` (RDP / PRV with a recorded
fallback).

A training loop (x, y: all training patches; patient_codes: one patient index per patch)::

    model = create_classifier("swin_micro", mode="full").to(device)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3, weight_decay=1e-8)
    dp = make_private(model, opt, record_ids=patient_codes, privacy_unit="patient",
                      expected_batch_size=64, epochs=8, target_epsilon=6.0, delta=1e-4,
                      max_grad_norm=1.0, accountant="prv", sampler_seed=seed,
                      physical_batch_size=64, grad_chunk=32)
    if resuming:
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"]); dp.load_state_dict(ck["dp"])
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(start_epoch, 8):
        for _ in range(dp.steps_per_epoch):
            idx = dp.sample_batch()  # Poisson: every patch of each sampled patient; may be empty
            dp.step(x[idx], y[idx], loss_fn, record_idx=idx, public=(xs, ys))  # writes .grad
            opt.step(); opt.zero_grad(set_to_none=True)
        ck = {"model": model.state_dict(), "opt": opt.state_dict(), "dp": dp.state_dict()}
        print(epoch, dp.epsilon_spent())
    privacy_record = dp.summary()
"""

import importlib

# Names resolved on first use (PEP 562), so that importing one submodule, e.g. `compose` in
# the model server or `engine` in a non-private run, does not import Opacus (~2 s a process).
_HOME = {
    "ACCOUNTANTS": "accountant", "PrivacyAccountant": "accountant", "calibrate_noise": "accountant",
    "make_accountant": "accountant", "DPSGD": "engine", "make_private": "engine",
    "clipped_grad_sum": "per_sample", "per_sample_gradients": "per_sample",
    "PoissonSampler": "sampler", "split_physical": "sampler", "steps_per_epoch": "sampler",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"mammodp.privacy.{_HOME[name]}"), name)
    raise AttributeError(f"module 'mammodp.privacy' has no attribute {name!r}")


__all__ = [
    "ACCOUNTANTS",
    "DPSGD",
    "PoissonSampler",
    "PrivacyAccountant",
    "calibrate_noise",
    "clipped_grad_sum",
    "make_accountant",
    "make_private",
    "per_sample_gradients",
    "split_physical",
    "steps_per_epoch",
]
