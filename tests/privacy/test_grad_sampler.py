"""The hook-based per-sample gradients: equal to vmap on both presets, refused where they
would be wrong, and checked at run time by the engine's `auto` mode (whose route, `mixed`,
is built on the same hooks)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mammodp.errors import PrivacyError
from mammodp.models.swin import PRESETS, SwinClassifier, create_classifier, trainable_parameters
from mammodp.privacy import make_private
from mammodp.privacy.grad_sampler import supports
from mammodp.privacy.per_sample import per_sample_gradients, resolve_method

LOSS = torch.nn.CrossEntropyLoss(label_smoothing=0.1)


def _max_rel_err(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in b)


def test_hooks_equal_vmap_with_swin_tiny_windows_and_rgb_input():
    # swin_tiny's layout (7x7 windows, shifted, 3 replicated channels) at a size that keeps
    # the test fast: 56 px -> 14x14 tokens (2x2 windows, shifted) -> 7x7 (one window).
    spec = copy.deepcopy(PRESETS["swin_tiny"])
    spec.update(img_size=56, feature_dim=32)
    spec["backbone"].update(embed_dim=16, depths=(2, 2), num_heads=(2, 4))
    torch.manual_seed(0)
    model = SwinClassifier("swin_tiny_small", spec, "full")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 1, 40, 40, generator=g), torch.tensor([0, 1, 1])  # upsampled to 56 inside
    ref, _ = per_sample_gradients(model, LOSS, x, y, method="vmap")
    fast, _ = per_sample_gradients(model, LOSS, x, y, method="hooks")
    table = fast["backbone.layers.0.blocks.1.attn.relative_position_bias_table"]
    assert table.shape == (3, 13 * 13, 2) and table.abs().sum() > 0  # shifted 7x7 block
    assert _max_rel_err(fast, ref) < 1e-4


class _BatchSecond(nn.Module):
    """Claims sample-major folding but runs its Linear on (tokens, B, C): hooks go wrong."""

    dp_sample_major = True

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)[:, :3, :].expand(-1, -1, 4)  # (B, 3, 4)
        return self.lin(t.transpose(0, 1)).mean(0)  # Linear sees (3, B, 4)


def test_supports_only_opted_in_models_of_known_layers():
    assert supports(create_classifier("swin_micro"))
    assert supports(create_classifier("swin_micro", mode="frozen_backbone"))
    assert not supports(nn.Sequential(nn.Flatten(), nn.Linear(64 * 64, 2)))  # did not opt in
    model = create_classifier("swin_micro")
    model.head.append(nn.Conv1d(2, 2, 1))  # a layer with no per-sample rule
    assert not supports(model)
    assert resolve_method(model, "auto") == "vmap"
    for method in ("hooks", "mixed", "ghost"):  # every hook-based route refuses it
        with pytest.raises(ValueError):
            resolve_method(model, method)
    with pytest.raises(PrivacyError):
        make_private(model, torch.optim.SGD(trainable_parameters(model), lr=0.1), record_ids=np.arange(4),
                     expected_batch_size=2, delta=1e-4, epochs=1, max_grad_norm=1.0, noise_multiplier=1.0,
                     per_sample_method="hooks")


def test_auto_mode_checks_hooks_against_vmap_and_falls_back():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 2, (6,), generator=g)
    wrong = _BatchSecond()
    fast, _ = per_sample_gradients(wrong, LOSS, x, y, method="hooks")
    ref, _ = per_sample_gradients(wrong, LOSS, x, y, method="vmap")
    assert _max_rel_err(fast, ref) > 1e-2  # the false claim really gives wrong gradients
    for model, expected in ((wrong, "vmap"), (create_classifier("swin_micro"), "mixed")):
        opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
        dp = make_private(model, opt, record_ids=np.arange(6), expected_batch_size=6, delta=1e-4, epochs=1,
                          max_grad_norm=1.0, noise_multiplier=0.0, accountant="rdp", sampler_seed=0)
        assert dp.per_sample_method == "mixed"  # chosen up front ...
        idx = dp.sample_batch()
        xs = x if expected == "vmap" else torch.rand(6, 1, 64, 64, generator=g)
        dp.step(xs[idx], y[idx], LOSS, record_idx=idx)
        summary = dp.summary()
        assert summary["per_sample_method"] == expected  # ... and kept only if it matches vmap
        assert ("disagreed" in summary["per_sample_method_note"]) == (expected == "vmap")


@pytest.mark.parametrize("method", ["hooks", "mixed"])
def test_a_users_forward_hook_that_rewrites_a_layer_output_leaves_the_gradients_right(method):
    # The recorder shadows each layer's forward for the pass (no module hooks of its own), so
    # it records the gradient w.r.t. what the layer computed, not w.r.t. what a user's forward
    # hook made of it (a recorder that used forward hooks, run after the user's, recorded
    # dL/d(2 out) as the fc1 output gradient: half the true per-sample gradient). After the
    # pass every layer is back on its class's forward, and an instance forward set before stays.
    torch.manual_seed(0)
    model = create_classifier("swin_micro")
    fc1 = model.backbone.layers[0].blocks[0].mlp.fc1
    handle = fc1.register_forward_hook(lambda mod, inp, out: out * 2.0)
    own_forward = model.backbone.layers[1].blocks[0].norm1.forward  # a bound method, as an instance attribute
    model.backbone.layers[1].blocks[0].norm1.forward = own_forward
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 1, 64, 64, generator=g), torch.tensor([0, 1, 1, 0])
    ref, _ = per_sample_gradients(model, LOSS, x, y, method="vmap")
    if method == "hooks":
        got, _ = per_sample_gradients(model, LOSS, x, y, method="hooks")
        assert _max_rel_err(got, ref) < 1e-3
    else:
        from mammodp.privacy.per_sample import clip_factors, clipped_grad_sum, record_norms

        norms = record_norms(ref)
        c = float(norms.median())
        res = clipped_grad_sum(model, LOSS, x, y, max_grad_norm=c, method="mixed")
        expected = {k: torch.einsum("r,r...->...", clip_factors(norms, c), v) for k, v in ref.items()}
        assert _max_rel_err(res.grads, expected) < 1e-3
        assert float((res.norms - norms).abs().max() / norms.max()) < 1e-3
    handle.remove()
    for name, module in model.named_modules():
        if name == "backbone.layers.1.blocks.0.norm1":
            assert module.__dict__["forward"] == own_forward
        else:
            assert "forward" not in module.__dict__ and "_get_rel_pos_bias" not in module.__dict__, name


class _PropertyForward(nn.Linear):
    """A Linear whose forward is a property: an instance attribute cannot shadow it."""

    @property
    def forward(self):
        return lambda x: nn.functional.linear(x, self.weight, self.bias)


class _OwnCall(nn.Linear):
    """A Linear called through its own __call__, which never calls forward."""

    def __call__(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("layer", [_PropertyForward, _OwnCall])
def test_layers_the_recorder_cannot_shadow_are_refused(layer):
    # The recorder sees a layer call only through its shadowed forward: a layer it cannot
    # shadow would be left out of the per-sample gradients (and of the clipping norm) unseen.
    model = create_classifier("swin_micro", mode="frozen_backbone")
    model.head[-1] = layer(model.head[-1].in_features, model.head[-1].out_features)
    assert not supports(model)
    assert resolve_method(model, "auto") == "vmap"
    with pytest.raises(ValueError):
        resolve_method(model, "mixed")


class _ByName(nn.Sequential):
    """Calls its Linear layers with the input passed by name."""

    def forward(self, x):
        for module in self:
            x = module(input=x) if isinstance(module, nn.Linear) else module(x)
        return x


def test_a_layer_called_with_its_input_by_name_is_recorded():
    torch.manual_seed(0)
    model = create_classifier("swin_micro", mode="frozen_backbone")
    model.head = _ByName(*model.head)
    x, y = torch.rand(4, 1, 64, 64), torch.tensor([0, 1, 1, 0])
    ref, _ = per_sample_gradients(model, LOSS, x, y, method="vmap")
    got, _ = per_sample_gradients(model, LOSS, x, y, method="hooks")
    assert _max_rel_err(got, ref) < 1e-4
