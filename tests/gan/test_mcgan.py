"""MCGAN networks: shapes, conditioning, the DP discriminator's per-sample gradients, detectors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mammodp.errors import ConfigError, WeightsError
from mammodp.models import mcgan


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_shapes_for_each_image_size(size):
    G, D, spec = mcgan.create_gan(image_size=size, latent_dim=8, width=4)
    z = torch.randn(3, 8)
    y = torch.tensor([0, 1, 1])
    with torch.no_grad():
        x = G(z, y)
    assert x.shape == (3, 1, size, size)
    assert float(x.abs().max()) <= 1.0  # Tanh output
    assert D(x, y).shape == (3,)


def test_paper_preset_has_the_papers_channels():
    G, D, spec = mcgan.create_gan("paper")
    assert (spec.image_size, spec.latent_dim, spec.width) == (128, 100, 64)
    g_convs = [m for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [m.in_channels for m in g_convs] == [200, 1024, 512, 256, 128, 64]
    assert g_convs[-1].out_channels == 1
    d_convs = [m for m in D.modules() if isinstance(m, torch.nn.Conv2d)]
    assert d_convs[0].in_channels == 2 and d_convs[0].kernel_size == (6, 6)
    assert [m.out_channels for m in d_convs] == [64, 128, 256, 512, 1024, 1]
    emb = [m for m in D.modules() if isinstance(m, torch.nn.Embedding)]
    assert emb[0].num_embeddings == 2 and emb[0].embedding_dim == 50


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="paper"):
        mcgan.create_gan("huge")
    with pytest.raises(ConfigError, match="image_size"):
        mcgan.create_gan(image_size=48)


def test_label_changes_the_output():
    torch.manual_seed(0)
    G, D, _ = mcgan.create_gan("tiny")
    G.eval()
    z = torch.randn(4, G.spec.latent_dim)
    with torch.no_grad():
        benign = G(z, torch.zeros(4, dtype=torch.long))
        malignant = G(z, torch.ones(4, dtype=torch.long))
        assert (benign - malignant).abs().max() > 1e-4
        x = torch.rand(4, 1, 16, 16) * 2 - 1
        D.eval()
        assert (D(x, torch.zeros(4, dtype=torch.long)) - D(x, torch.ones(4, dtype=torch.long))).abs().max() > 1e-6


def test_activations_are_out_of_place_and_dp_discriminator_is_opacus_valid():
    from opacus.validators import ModuleValidator

    G, D_dp, _ = mcgan.create_gan("tiny", dp=True)
    _, D_plain, _ = mcgan.create_gan("tiny", dp=False)
    for m in list(G.modules()) + list(D_dp.modules()):
        assert not getattr(m, "inplace", False), m
    assert ModuleValidator.validate(D_dp, strict=False) == []
    assert ModuleValidator.validate(D_plain, strict=False)  # BatchNorm is rejected
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in D_dp.modules())


def test_dp_discriminator_per_sample_gradients_equal_a_loop():
    from opacus import GradSampleModule

    torch.manual_seed(0)
    _, D, _ = mcgan.create_gan(image_size=16, latent_dim=8, width=4, dp=True)
    plain = copy.deepcopy(D)
    gsm = GradSampleModule(D, loss_reduction="mean")
    n = 5
    real, fake = torch.rand(n, 1, 16, 16) * 2 - 1, torch.rand(n, 1, 16, 16) * 2 - 1
    labels, fake_labels = torch.randint(0, 2, (n,)), torch.randint(0, 2, (n,))
    targets = torch.cat([torch.rand(n) * 0.5 + 0.7, torch.zeros(n)])
    mcgan.paired_per_sample_gradients(gsm, real, labels, fake, fake_labels, targets)
    params = [p for p in D.parameters() if p.requires_grad]
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    for i in range(n):
        loss = (F.binary_cross_entropy_with_logits(plain(real[i : i + 1], labels[i : i + 1]), targets[i : i + 1])
                + F.binary_cross_entropy_with_logits(plain(fake[i : i + 1], fake_labels[i : i + 1]),
                                                     targets[n + i : n + i + 1]))
        grads = torch.autograd.grad(loss, plain_params)
        for p, g in zip(params, grads):
            assert p.grad_sample.shape[0] == n
            torch.testing.assert_close(p.grad_sample[i], g, rtol=1e-4, atol=1e-6)


def test_private_step_without_noise_or_clipping_equals_a_plain_step():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    G, D, _ = mcgan.create_gan(image_size=16, latent_dim=8, width=4, dp=True)
    D_plain = copy.deepcopy(D)
    n = 6
    real, labels = torch.rand(n, 1, 16, 16) * 2 - 1, torch.randint(0, 2, (n,))
    gsm = GradSampleModule(D, loss_reduction="mean")
    dp_opt = DPOptimizer(torch.optim.SGD(D.parameters(), lr=0.5), noise_multiplier=0.0, max_grad_norm=1e9,
                         expected_batch_size=n)
    plain_opt = torch.optim.SGD(D_plain.parameters(), lr=0.5)
    s_dp = mcgan.discriminator_step(gsm, G, dp_opt, real, labels, label_range=(0.7, 1.2),
                                    generator=torch.Generator().manual_seed(1))
    s_plain = mcgan.discriminator_step(D_plain, G, plain_opt, real, labels, label_range=(0.7, 1.2),
                                       generator=torch.Generator().manual_seed(1))
    assert s_dp["loss_d"] == pytest.approx(s_plain["loss_d"], rel=1e-5)
    for p, q in zip(D.parameters(), D_plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_clipping_bounds_each_records_contribution():
    """With C small and no noise, the update is at most lr * C * B / B_expected in norm."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    G, D, _ = mcgan.create_gan(image_size=16, latent_dim=8, width=4, dp=True)
    before = [p.detach().clone() for p in D.parameters()]
    n, c, lr = 4, 1e-3, 1.0
    gsm = GradSampleModule(D, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(D.parameters(), lr=lr), noise_multiplier=0.0, max_grad_norm=c,
                      expected_batch_size=n)
    mcgan.discriminator_step(gsm, G, opt, torch.rand(n, 1, 16, 16), torch.randint(0, 2, (n,)),
                             label_range=(0.7, 1.2))
    step = math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(D.parameters(), before)))
    assert 0 < step <= lr * c * (1 + 1e-4)


def test_sample_is_deterministic_and_seed_dependent(tmp_path):
    torch.manual_seed(0)
    G, _, _ = mcgan.create_gan("tiny")
    labels = np.array([0, 1, 0, 1])
    a = mcgan.sample(G, labels, seed=5)
    assert a.shape == (4, 1, 16, 16) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, mcgan.sample(G, labels, seed=5))
    assert np.abs(a - mcgan.sample(G, labels, seed=6)).max() > 0
    mcgan.save_generator(tmp_path / "g.pt", G, meta={"epsilon": "non-private"})
    G2, meta = mcgan.load_generator(tmp_path / "g.pt")
    assert meta == {"epsilon": "non-private"}
    np.testing.assert_array_equal(a, mcgan.sample(G2, labels, seed=5))


def test_load_generator_names_a_missing_or_broken_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        mcgan.load_generator(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="bad.pt"):
        mcgan.load_generator(tmp_path / "bad.pt")


def test_mode_collapse_and_divergence_detectors():
    rng = np.random.default_rng(0)
    real = rng.random((16, 1, 16, 16)).astype(np.float32)
    collapsed = np.repeat(real[:1], 16, axis=0) + rng.normal(0, 1e-3, (16, 1, 16, 16)).astype(np.float32)
    d_real = mcgan.pairwise_diversity(real)
    assert mcgan.pairwise_diversity(real[:1].repeat(4, axis=0)) == pytest.approx(0.0, abs=1e-6)
    assert mcgan.mode_collapse(mcgan.pairwise_diversity(collapsed), d_real, 0.1)
    assert not mcgan.mode_collapse(mcgan.pairwise_diversity(rng.random((16, 1, 16, 16))), d_real, 0.1)
    assert mcgan.diverged({"loss_d": 0.7, "loss_g": 2.0}, 20.0) is None
    assert "loss_g" in mcgan.diverged({"loss_d": 0.7, "loss_g": float("nan")}, 20.0)
    assert "exceeds" in mcgan.diverged({"loss_d": 25.0, "loss_g": 1.0}, 20.0)
