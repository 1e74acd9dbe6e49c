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
from mammodp.runtime import to_device


@pytest.mark.parametrize("d_stem", [False, True], ids=["no-stem", "stem"])
@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_shapes_for_each_image_size(size, d_stem):
    G, D, spec = mcgan.create_gan(image_size=size, latent_dim=8, width=4, d_stem=d_stem)
    first = D.main[0]
    assert (first.kernel_size, first.stride) == (((3, 3), (1, 1)) if d_stem else ((6, 6), (2, 2)))
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


def _paired_inputs(n: int, size: int = 16, latent: int = 8, seed: int = 0, d_stem: bool = False):
    """Packed (real, fake) pairs of a tiny generator, as the DP step builds them."""
    g = torch.Generator().manual_seed(seed)
    G, D, _ = mcgan.create_gan(image_size=size, latent_dim=latent, width=4, dp=True, d_stem=d_stem)
    real, labels = torch.rand(n, 1, size, size, generator=g) * 2 - 1, torch.randint(0, 2, (n,), generator=g)
    draws = mcgan.draw_per_sample(n, latent, (0.7, 1.2), flips=True, generator=g)
    inputs, targets = mcgan.dp_batch(G, real, labels, draws, torch.device("cpu"))
    return G, D, inputs, targets


@pytest.mark.parametrize("d_stem", [False, True], ids=["no-stem", "stem"])
def test_paired_discriminator_per_sample_gradients_equal_a_loop(d_stem):
    from mammodp.privacy.per_sample import per_sample_gradients

    torch.manual_seed(0)
    n = 5
    _, D, inputs, targets = _paired_inputs(n, d_stem=d_stem)
    paired = mcgan.PairedDiscriminator(D)
    grads, _ = per_sample_gradients(paired, mcgan.paired_bce, inputs, targets, method="vmap")
    params = dict(paired.named_parameters())
    for i in range(n):
        # Record i's loss: BCE(D(real_i), t_i) + BCE(D(fake_i), 0), by plain autograd.
        real, fake = inputs[i : i + 1, 0:1], inputs[i : i + 1, 2:3]
        lab, fake_lab = inputs[i : i + 1, 1, 0, 0].long(), inputs[i : i + 1, 3, 0, 0].long()
        loss = (F.binary_cross_entropy_with_logits(D(real, lab), targets[i : i + 1, 0])
                + F.binary_cross_entropy_with_logits(D(fake, fake_lab), targets[i : i + 1, 1]))
        for (name, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            torch.testing.assert_close(grads[name][i], g, rtol=1e-4, atol=1e-6, msg=name)


def test_dp_discriminator_refuses_batchnorm():
    _, D_plain, _ = mcgan.create_gan("tiny", dp=False)
    with pytest.raises(ConfigError, match="GroupNorm"):
        mcgan.PairedDiscriminator(D_plain)


def test_private_step_without_noise_or_clipping_equals_a_plain_step():
    from mammodp.privacy import make_private

    torch.manual_seed(0)
    n = 6
    _, D, inputs, targets = _paired_inputs(n)
    D_plain = copy.deepcopy(D)
    opt = torch.optim.SGD(D.parameters(), lr=0.5)
    # q = 1 (every record in every batch), C = inf, sigma = 0: DP-SGD is plain SGD on the mean loss.
    dp = make_private(mcgan.PairedDiscriminator(D), opt, record_ids=np.arange(n), expected_batch_size=n,
                      delta=1e-3, epochs=1, max_grad_norm=math.inf, noise_multiplier=0.0, accountant="rdp",
                      sampler_seed=0, per_sample_method="vmap")
    idx = dp.sample_batch()
    assert sorted(idx.tolist()) == list(range(n))
    dp.step(inputs[idx], targets[idx], mcgan.paired_bce, record_idx=idx)
    opt.step()
    plain_opt = torch.optim.SGD(D_plain.parameters(), lr=0.5)
    mcgan.paired_bce(mcgan.PairedDiscriminator(D_plain)(inputs), targets).backward()
    plain_opt.step()
    for p, q in zip(D.parameters(), D_plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_clipping_bounds_each_records_contribution():
    """With C small and no noise, one SGD update is at most lr * C * B / E in norm."""
    from mammodp.privacy import make_private

    torch.manual_seed(0)
    n, c, lr = 4, 1e-3, 1.0
    _, D, inputs, targets = _paired_inputs(n)
    before = [p.detach().clone() for p in D.parameters()]
    opt = torch.optim.SGD(D.parameters(), lr=lr)
    dp = make_private(mcgan.PairedDiscriminator(D), opt, record_ids=np.arange(n), expected_batch_size=n,
                      delta=1e-3, epochs=1, max_grad_norm=c, noise_multiplier=0.0, accountant="rdp",
                      sampler_seed=0, per_sample_method="vmap")
    idx = dp.sample_batch()
    dp.step(inputs[idx], targets[idx], mcgan.paired_bce, record_idx=idx)
    opt.step()
    step = math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(D.parameters(), before)))
    assert 0 < step <= lr * c * (1 + 1e-4)


def _record_grad(D, G, images, labels, draws, batch, record, fake_fn=None):
    """Clipped gradient (C = 1) of `record` when the Poisson batch is `batch`."""
    from mammodp.privacy.per_sample import clip_factors, per_sample_gradients, record_norms

    idx = torch.tensor(batch)
    sel = draws.select(idx)
    if fake_fn is None:
        inputs, targets = mcgan.dp_batch(G, images[idx], labels[idx], sel, torch.device("cpu"))
    else:  # the discarded design: fakes from the generator in train mode, per batch
        with torch.no_grad():
            fake = fake_fn(sel.z, sel.fake_labels)
        inputs = mcgan.pack_pairs(images[idx], labels[idx], fake, sel.fake_labels)
        targets = torch.stack([sel.targets, torch.zeros_like(sel.targets)], 1)
    grads, _ = per_sample_gradients(mcgan.PairedDiscriminator(D), mcgan.paired_bce, inputs, targets, method="vmap")
    pos = batch.index(record)
    factor = clip_factors(record_norms({k: v[pos : pos + 1] for k, v in grads.items()}), 1.0)[0]
    return torch.cat([(v[pos] * factor).flatten() for v in grads.values()])


def test_a_records_clipped_contribution_does_not_change_when_another_record_joins():
    torch.manual_seed(0)
    n = 6
    G, D, _ = mcgan.create_gan(image_size=16, latent_dim=8, width=4, dp=True)
    G.train()  # as during training: the generator's BatchNorm would use batch statistics
    g = torch.Generator().manual_seed(3)
    images, labels = torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 2, (n,), generator=g)
    draws = mcgan.draw_per_sample(n, 8, (0.7, 1.2), flips=True, generator=g)  # one step's draws
    alone = _record_grad(D, G, images, labels, draws, [2], 2)
    for batch in ([0, 2], [2, 5], [0, 1, 2, 3, 4, 5]):
        # Equal up to float rounding of batched kernels (~1e-8); the coupling below is ~1e-2.
        torch.testing.assert_close(_record_grad(D, G, images, labels, draws, batch, 2), alone, rtol=1e-5, atol=1e-6)
    # Control: fakes from the generator in train mode (batch statistics) couple the records.
    coupled = _record_grad(D, G, images, labels, draws, [2], 2, fake_fn=G)
    joined = _record_grad(D, G, images, labels, draws, [0, 2], 2, fake_fn=G)
    assert float((coupled - joined).norm()) > 1e-3 * float(coupled.norm())


def test_per_sample_draws_do_not_depend_on_the_batch():
    a = mcgan.draw_per_sample(10, 4, (0.7, 1.2), flips=True, generator=torch.Generator().manual_seed(0))
    b = mcgan.draw_per_sample(10, 4, (0.7, 1.2), flips=True, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([1, 7])
    torch.testing.assert_close(a.select(idx).z, b.select(torch.tensor([7, 1, 2])).z[[1, 0]])
    assert ((a.targets >= 0.7) & (a.targets <= 1.2)).all()


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


@pytest.mark.parametrize("how", ["resize_conv", "transposed"])
def test_resize_then_convolve_upsampling_paints_no_checkerboard(how):
    """A flat feature map stays flat through resize-conv; a stride-2 ConvTranspose gives its
    interior a period-2 pattern whatever its (random) weights: the checkerboard of Odena et al."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(*mcgan._upsample(8, 4, how))
    with torch.no_grad():
        out = layer(torch.ones(1, 8, 8, 8))[0, :, 2:-2, 2:-2]  # interior, away from the padding
    spread = (out - out.mean(dim=(1, 2), keepdim=True)).abs().max().item()
    if how == "resize_conv":
        assert spread < 1e-5
    else:
        assert spread > 1e-2
    G, _, spec = mcgan.create_gan("tiny", upsample=how)
    assert spec.upsample == how
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in G.main[3:]) == (how == "transposed")


def test_generator_ema_averages_parameters_and_recollects_batchnorm_statistics():
    G, _, _ = mcgan.create_gan("tiny")
    ema = mcgan.GeneratorEMA(G, 0.75)
    before = [p.detach().clone() for p in G.parameters()]
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
    ema.update(G)
    for avg, old, new in zip(ema.average.parameters(), before, G.parameters()):
        torch.testing.assert_close(avg, 0.75 * old + 0.25 * new)
        assert not avg.requires_grad
    # finalize: each BatchNorm's running mean is the mean over the passes' batch means.
    first = next(m for m in ema.average.modules() if isinstance(m, torch.nn.BatchNorm2d))
    means = []
    hook = first.register_forward_hook(lambda mod, inp, out: means.append(inp[0].mean((0, 2, 3))))
    G2 = ema.finalize(batches=3, batch=8, seed=5)
    hook.remove()
    assert len(means) == 3 and not G2.training and first.momentum == 0.1
    torch.testing.assert_close(first.running_mean, torch.stack(means).mean(0))
    # Same seed, same statistics; live generator untouched.
    again = mcgan.GeneratorEMA(G, 0.75)
    again.load_state_dict(ema.state_dict())
    torch.testing.assert_close(again.finalize(batches=3, batch=8, seed=5).state_dict()["main.1.running_var"],
                               G2.state_dict()["main.1.running_var"])
    assert G.training


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_generator_ema_refuses_a_decay_outside_the_open_interval(decay):
    G, _, _ = mcgan.create_gan("tiny")
    with pytest.raises(ConfigError, match="gan.ema_decay"):
        mcgan.GeneratorEMA(G, decay)


@pytest.mark.parametrize("d_stem", [False, True], ids=["no-stem", "stem"])
def test_texture_features_are_the_first_stride_2_block_and_touch_no_batchnorm(d_stem):
    _, D, spec = mcgan.create_gan(image_size=32, latent_dim=8, width=4, d_stem=d_stem)
    D.train()
    before = copy.deepcopy(D.state_dict())
    x, y = torch.rand(5, 1, 32, 32) * 2 - 1, torch.tensor([0, 1, 1, 0, 1])
    f = D.texture_features(x, y)
    assert f.shape == (5, 4, 16, 16)
    # By hand: the label plane as a second channel, then [stem +] the k6 s2 conv + LeakyReLU.
    h = torch.cat([x, D.label_path(y).view(-1, 1, 32, 32)], 1)
    if d_stem:
        h = F.leaky_relu(D.main[0](h), mcgan.D_LEAK)
    expect = F.leaky_relu(F.conv2d(h, D.main[2 if d_stem else 0].weight, stride=2, padding=2), mcgan.D_LEAK)
    torch.testing.assert_close(f, expect)
    for k, v in D.state_dict().items():  # running statistics included
        assert torch.equal(v, before[k]), k


def test_feature_matching_loss_compares_channel_means_and_spreads():
    a = torch.randn(6, 3, 5, 5)
    assert float(mcgan.feature_matching_loss(a, a.clone())) == 0.0
    # Same moments, other samples: still 0 (it matches statistics, not images).
    assert float(mcgan.feature_matching_loss(a, a.flip(0).flip(-1))) == pytest.approx(0.0, abs=1e-10)
    b = a * 2 + 1
    m, s = a.mean((0, 2, 3)), a.std((0, 2, 3))
    expect = ((m - (2 * m + 1)) ** 2).sum() + ((s - 2 * s) ** 2).sum()
    torch.testing.assert_close(mcgan.feature_matching_loss(a, b), expect)


def test_generator_step_adds_the_weighted_feature_matching_term():
    torch.manual_seed(0)
    G, D, _ = mcgan.create_gan(image_size=16, latent_dim=8, width=4, d_stem=True)
    real, labels = torch.rand(6, 1, 16, 16) * 2 - 1, torch.tensor([0, 1, 0, 1, 1, 0])
    lam = 2.5

    def step(**kw):
        g = copy.deepcopy(G)
        opt = torch.optim.SGD(g.parameters(), lr=1.0)
        stats = mcgan.generator_step(g, D, opt, batch=4, device=torch.device("cpu"),
                                     generator=torch.Generator().manual_seed(3), **kw)
        assert all(isinstance(v, torch.Tensor) and v.shape == () for v in stats.values())  # not read
        return g, mcgan.read_stats(stats)

    plain, s0 = step()
    assert "loss_fm" not in s0
    same, s1 = step(real=real, real_labels=labels, feature_matching=0.0)  # weight 0: the plain step
    for p, q in zip(plain.parameters(), same.parameters()):
        assert torch.equal(p, q)
    matched, s2 = step(real=real, real_labels=labels, feature_matching=lam)
    assert s2["loss_g"] == s0["loss_g"] and s2["loss_fm"] > 0
    assert all(p.grad is None for p in D.parameters())  # the discriminator's gradients cleared
    # By hand: SGD with lr 1 moves each weight by minus its gradient.
    g = copy.deepcopy(G)
    rng = torch.Generator().manual_seed(3)
    z = torch.randn(4, 8, generator=rng)
    fl = mcgan.random_labels(4, torch.device("cpu"), rng)
    fake = g(z, fl)
    out = D(fake, fl)
    loss = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
    with torch.no_grad():
        target = D.texture_features(real, labels)
    fm = mcgan.feature_matching_loss(D.texture_features(fake, fl), target)
    assert float(fm.detach()) == pytest.approx(s2["loss_fm"], rel=1e-6)
    grads = torch.autograd.grad(loss + lam * fm, list(g.parameters()))
    for p0, p1, gr in zip(G.parameters(), matched.parameters(), grads):
        torch.testing.assert_close(p1, p0 - gr, rtol=1e-5, atol=1e-6)


def test_read_stats_reads_a_step_once_and_keeps_its_order():
    stats = {"loss_g": torch.tensor(0.5), "n": 2.0, "d_real": torch.tensor(0.25, dtype=torch.float64)}
    assert mcgan.read_stats(stats) == {"loss_g": 0.5, "n": 2.0, "d_real": 0.25}
    assert list(mcgan.read_stats(stats)) == ["loss_g", "n", "d_real"]
    # float64 sums (the warm start's, over an epoch) are read in full: 1/3 is not float32's
    assert mcgan.read_stats({"s": torch.tensor(1 / 3, dtype=torch.float64)}) == {"s": 1 / 3}
    G, D, _ = mcgan.create_gan(image_size=16, latent_dim=8, width=4)
    empty = mcgan.discriminator_step(D, G, torch.optim.SGD(D.parameters(), lr=0.1), torch.zeros(0, 1, 16, 16),
                                     torch.zeros(0, dtype=torch.long), label_range=(0.7, 1.2))
    assert all(math.isnan(v) for v in mcgan.read_stats(empty).values())  # an empty batch: NaN, not read


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("private", "amp"), [(False, False), (False, True), (True, False)],
                         ids=["plain", "plain-amp", "dp-inputs"])
def test_gan_steps_on_cuda_never_wait_for_the_device(private, amp):
    """No synchronising call in a warm GAN step (torch's sync debug mode raises on one): the
    draws and image batches are copied from pinned memory, statistics stay on the device;
    under AMP, train-gan's fused Adam takes the scaler's inf check on the device (with any
    other optimiser GradScaler.step reads it back)."""
    dev = torch.device("cuda")
    G, D, _ = mcgan.create_gan(image_size=16, latent_dim=8, width=4, dp=private)
    G, D = (m.to(dev, memory_format=torch.channels_last) for m in (G, D))  # as train-gan places them
    fused = True if amp else None  # as train-gan builds them
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, fused=fused)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, fused=fused)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    g = torch.Generator().manual_seed(0)
    real, labels = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 2, (8,), generator=g)
    draws = mcgan.draw_per_sample(8, 8, (0.7, 1.2), flips=True, generator=g)

    def step():
        if private:  # the DP step's inputs (the engine's step is tested in tests/privacy)
            out = mcgan.dp_batch(G, real, labels, draws, dev)
            stats = {"pairs": out[0].sum()}
        else:
            stats = mcgan.discriminator_step(D, G, opt_d, to_device(real, dev), to_device(labels, dev),
                                             label_range=(0.7, 1.2), generator=g, scaler=scaler, autocast=amp)
        stats |= mcgan.generator_step(G, D, opt_g, batch=8, device=dev, generator=g, scaler=scaler, autocast=amp)
        if scaler is not None:
            scaler.update()
        return stats

    step()  # warm: the first step allocates and loads kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.device.type == "cuda" for v in stats.values())
    assert all(math.isfinite(v) for v in mcgan.read_stats(stats).values())
