"""CFE, PGM and the VGG of L_dpl at their boundary: other dtypes compute, bad input is a named error, NaN
is caught with no host sync of its own inside an enclosing deferred-check block."""
from __future__ import annotations

import pytest
import torch

from perceive_components import CFE, PGM
from perceive_components.losses import DifficultyAdaptivePerceptualLoss
from perceive_components.ops import validation
from perceive_components.ops.validation import deferred_value_checks
from perceive_components.tiny import tiny_vgg


@pytest.fixture()
def syncs(monkeypatch):
    """Shapes of the value-check host reads (one entry per sync)."""
    seen = []
    monkeypatch.setattr(validation, "host_values", lambda stats: seen.append(tuple(stats.shape)) or stats.tolist())
    return seen


def nan_at(shape, index=(0,)):
    tensor = torch.rand(shape)
    tensor[index] = float("nan")
    return tensor


# ----------------------------------------------------------------------------- CFE
def test_cfe_computes_other_float_dtypes_in_its_own():
    torch.manual_seed(0)
    cfe, images = CFE(), torch.rand(2, 3, 20, 24)
    expected = cfe(images)
    torch.testing.assert_close(cfe(images.double()), expected)  # float64 into a float32 CFE
    torch.testing.assert_close(cfe(images.half()), cfe(images.half().float()))
    assert cfe.double()(images).dtype == torch.float64  # and a float64 CFE takes float32 images


@pytest.mark.parametrize("images, error, message", [
    ((torch.rand(2, 3, 16, 16) * 255).byte(), TypeError, r"images must be a floating-point tensor.*\.float\(\) / 255"),
    (torch.rand(2, 1, 16, 16), ValueError, "images must have 3 channels"),
    (nan_at((2, 3, 16, 16), (1, 2, 3, 4)), ValueError, "images contains NaN or Inf"),
    (torch.rand(2, 3, 16, 16) * 255, ValueError, r"images must hold values in \[0, 1\]"),
])
def test_cfe_names_bad_images(images, error, message):
    with pytest.raises(error, match=message):
        CFE()(images)


def test_cfe_value_check_shares_the_enclosing_sync_and_can_be_switched_off(syncs):
    cfe, images = CFE(), torch.rand(2, 3, 16, 16)
    cfe(images)
    assert syncs == [(1, 2)]  # alone: one read, after the encoder is queued
    syncs.clear()
    with deferred_value_checks():
        validation.check_images(images.clone(), "outer")
        cfe(images)
    assert syncs == [(2, 2)]  # inside a block: no sync of its own
    syncs.clear()
    unchecked = CFE(validate_inputs=False)
    assert torch.isnan(unchecked(nan_at((1, 3, 16, 16)))).all() and syncs == []
    with pytest.raises(TypeError, match="floating-point"):
        unchecked(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


# ----------------------------------------------------------------------------- PGM
def test_pgm_batch_mismatches_name_the_input():
    pgm, x = PGM(8, prior_dim=16, embed_dim=4), torch.rand(2, 8, 5, 5)
    with pytest.raises(ValueError, match="prior has batch 3 but x has batch 2"):
        pgm(x, torch.rand(3, 16), torch.rand(2, 4))
    with pytest.raises(ValueError, match="embedding has batch 1 but x has batch 2"):
        pgm(x, torch.rand(2, 16), torch.rand(1, 4))
    with pytest.raises(ValueError, match="prior has batch 3"):  # both wrong alike: still x's batch that counts
        pgm(x, torch.rand(3, 16), torch.rand(3, 4))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        pgm(x.long(), torch.rand(2, 16), torch.rand(2, 4))
    with pytest.raises(TypeError, match="embedding must be a floating-point tensor"):
        pgm(x, torch.rand(2, 16), torch.ones(2, 4, dtype=torch.long))


def test_pgm_runs_the_conditioning_in_its_dtype():
    torch.manual_seed(0)
    pgm, x, prior, z = PGM(8, prior_dim=16, embed_dim=4), torch.rand(2, 8, 5, 5), torch.rand(2, 16), torch.rand(2, 4)
    expected = pgm(x, prior, z)
    torch.testing.assert_close(pgm(x, prior.double(), z.double()), expected)
    assert pgm(x.double(), prior, z).dtype == torch.float64  # Y keeps x's dtype


@pytest.mark.parametrize("name", ["x", "prior", "embedding"])
def test_pgm_catches_nan_in_every_input(name, syncs):
    pgm = PGM(8, prior_dim=16, embed_dim=4)
    inputs = {"x": torch.rand(2, 8, 5, 5), "prior": torch.rand(2, 16), "embedding": torch.rand(2, 4)}
    inputs[name] = nan_at(tuple(inputs[name].shape))
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        pgm(inputs["x"], inputs["prior"], inputs["embedding"])
    assert syncs == [(3, 2)]  # the three checks, one read
    syncs.clear()
    assert torch.isnan(PGM(8, 16, 4, validate_inputs=False)(**inputs)).any() and syncs == []


# ----------------------------------------------------------------------------- VGG (L_dpl)
def test_perceptual_loss_takes_float64_restored_with_a_float32_vgg():
    criterion = DifficultyAdaptivePerceptualLoss(tiny_vgg(), pretrained=False)
    generator = torch.Generator().manual_seed(0)
    restored, gt, degraded = (torch.rand(2, 3, 16, 16, generator=generator) for _ in range(3))
    expected = criterion(restored, gt, degraded)
    wide = restored.double().requires_grad_(True)
    value = criterion(wide, gt, degraded)
    torch.testing.assert_close(value.float(), expected)
    value.backward()
    assert wide.grad is not None and wide.grad.dtype == torch.float64 and wide.grad.abs().sum() > 0


def test_set_value_checks_switches_every_submodule(syncs):
    from torch import nn

    from perceive_components.ops.validation import set_value_checks

    net = nn.ModuleDict({"cfe": CFE(embed_dim=4), "levels": nn.ModuleList([PGM(8, 16, 4), PGM(8, 16, 4)])})
    assert set_value_checks(net, False) is net
    assert [m.validate_inputs for m in (net["cfe"], *net["levels"])] == [False, False, False]
    z = net["cfe"](nan_at((1, 3, 16, 16)))
    net["levels"][0](torch.rand(1, 8, 4, 4), torch.rand(1, 16), z)
    assert syncs == []  # nothing read back to the host mid-forward
    set_value_checks(net, True)
    with pytest.raises(ValueError, match="images contains NaN"):
        net["cfe"](nan_at((1, 3, 16, 16)))
