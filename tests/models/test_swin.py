"""Classifier factory: presets, input handling, local weights, frozen backbone."""

from __future__ import annotations

import pytest
import torch

from mammodp.errors import ConfigError, WeightsError
from mammodp.models.swin import PRESETS, create_classifier, trainable_parameters


def _n(params) -> int:
    return sum(p.numel() for p in params)


def test_swin_micro_has_about_100k_parameters():
    model = create_classifier("swin_micro")
    assert 80_000 <= _n(model.parameters()) <= 120_000
    assert model.head[0].in_features == PRESETS["swin_micro"]["feature_dim"]


@pytest.mark.parametrize("size", [64, 48, 80])
def test_logits_shape_at_any_patch_size(size):
    torch.manual_seed(0)
    model = create_classifier("swin_micro").eval()
    out = model(torch.rand(3, 1, size, size))
    assert out.shape == (3, 2)
    assert torch.isfinite(out).all()


def test_normalisation_lives_in_the_model():
    model = create_classifier("swin_micro").eval()
    x = torch.rand(2, 1, 48, 48)
    pre = model.preprocess(x)
    assert pre.shape == (2, 1, 64, 64)
    # Each patch is standardised to mean 0.5 / std 0.25, then normalised with 0.5 / 0.5:
    # per sample, the backbone sees mean 0 and std 0.5, whatever the patch's brightness.
    flat = pre.flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(2), atol=1e-4)
    assert torch.allclose(flat.std(1), torch.full((2,), 0.5), atol=1e-2)
    dark, bright = torch.rand(1, 1, 64, 64) * 0.2, None
    bright = dark + 0.7  # the same texture, brighter: identical model input
    assert torch.allclose(model.preprocess(dark), model.preprocess(bright), atol=1e-4)
    full = torch.full((1, 1, 64, 64), 0.5)  # a blank patch stays blank (no division blow-up)
    assert torch.allclose(model.preprocess(full), torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError):
        model(torch.rand(2, 3, 64, 64))  # colour input is a caller bug


def test_swin_tiny_preset_matches_the_paper_head():
    model = create_classifier("swin_tiny", mode="frozen_backbone").eval()
    head = model.head
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (768, 384, 2)
    assert _n(trainable_parameters(model)) == 768 * 384 + 384 + 384 * 2 + 2  # 296k, the paper's head
    pre = model.preprocess(torch.rand(1, 1, 64, 64))
    assert pre.shape == (1, 3, 224, 224)  # grey replicated to RGB at 224 px
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 64)).shape == (1, 2)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError) as err:
        create_classifier("swin_huge")
    assert "swin_micro" in str(err.value) and "swin_tiny" in str(err.value)
    with pytest.raises(ConfigError):
        create_classifier("swin_micro", mode="half")


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "swin.pth"
    with pytest.raises(WeightsError) as err:
        create_classifier("swin_micro", pretrained_weights=missing)
    assert str(missing) in str(err.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_saved_state_dict_round_trips(tmp_path, suffix):
    torch.manual_seed(1)
    a = create_classifier("swin_micro").eval()
    path = tmp_path / f"clf{suffix}"
    if suffix == ".pth":
        torch.save(a.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(path))
    torch.manual_seed(2)
    b = create_classifier("swin_micro", pretrained_weights=path).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_timm_checkpoint_loads_backbone_and_ignores_its_classifier(tmp_path):
    torch.manual_seed(3)
    src = create_classifier("swin_micro")
    sd = dict(src.backbone.state_dict())
    sd["head.fc.weight"] = torch.zeros(1000, 64)  # an ImageNet classifier that does not fit
    sd["head.fc.bias"] = torch.zeros(1000)
    path = tmp_path / "timm_swin.pth"
    torch.save({"model": sd}, path)
    torch.manual_seed(4)
    loaded = create_classifier("swin_micro", pretrained_weights=path)
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[k], v), k
    # the head keeps its random initialisation: equal to a model built from the same seed
    torch.manual_seed(4)
    fresh = create_classifier("swin_micro")
    for k, v in fresh.head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[k], v), k
    assert not torch.equal(fresh.head[0].weight, src.head[0].weight)


def test_weights_that_do_not_fit_list_missing_and_unexpected_keys(tmp_path):
    sd = create_classifier("swin_micro").state_dict()
    sd = {k: v for k, v in sd.items() if "layers.2" not in k}
    sd["backbone.extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pt"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        create_classifier("swin_micro", pretrained_weights=path)
    msg = str(err.value)
    assert str(path) in msg and "missing keys" in msg and "unexpected keys" in msg and "layers.2" in msg

    tiny_path = tmp_path / "other_preset.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4)}, tiny_path)
    with pytest.raises(WeightsError):
        create_classifier("swin_micro", pretrained_weights=tiny_path)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError) as err:
        create_classifier("swin_micro", pretrained_weights=garbage)
    assert str(garbage) in str(err.value)


def test_frozen_backbone_trains_only_the_head():
    torch.manual_seed(5)
    model = create_classifier("swin_micro", mode="frozen_backbone")
    trainable = {id(p) for p in trainable_parameters(model)}
    assert trainable == {id(p) for p in model.head.parameters()}
    model.train()
    assert not model.backbone.training and model.head.training
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = [p.detach().clone() for p in model.head.parameters()]
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(torch.rand(4, 1, 64, 64)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_no_inplace_activations_and_no_stochastic_layers(preset):
    model = create_classifier(preset)
    for name, module in model.named_modules():
        assert not getattr(module, "inplace", False), f"{name} is in-place"
        assert not isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)), name
        p = getattr(module, "p", None) if isinstance(module, torch.nn.Dropout) else None
        assert not p, f"{name} has dropout {p}"
        assert getattr(module, "drop_prob", 0.0) == 0.0, f"{name} has drop-path"
