"""Shared ops: tiling, padding, metrics, atomic writes, RNG state, frozen holders, image io."""
from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from perceive_components.ops.checkpoint import atomic_write, load_state, rng_state, save_state, set_rng_state
from perceive_components.ops.frozen import FrozenHolder
from perceive_components.ops.io import read_image, write_image
from perceive_components.ops.metrics import psnr, quantize_8bit, ssim
from perceive_components.ops.tiling import pad_to_multiple, tiled_apply


def local_net(radius: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=1) for _ in range(radius)]).eval()


@pytest.mark.parametrize("size, tile, overlap, radius", [((203, 150), 64, 16, 4), ((70, 90), 32, 8, 2),
                                                          ((64, 64), 32, 16, 4), ((33, 200), 32, 12, 3)])
def test_tiling_is_exact_for_models_whose_receptive_field_fits_the_margin(size, tile, overlap, radius):
    x = torch.rand(2, 3, *size)
    model = local_net(radius)
    whole = tiled_apply(model, x, tile=None, pad_mode="replicate")
    tiled = tiled_apply(model, x, tile=tile, overlap=overlap, pad_mode="replicate")
    assert tiled.shape == x.shape
    assert torch.allclose(tiled, whole, atol=1e-5), (tiled - whole).abs().max()


def test_tiling_bounds_the_size_seen_by_the_model():
    seen = []

    def model(batch):
        seen.append(tuple(batch.shape))
        return batch * 2

    x = torch.rand(1, 3, 100, 130)
    assert torch.allclose(tiled_apply(model, x, tile=32, overlap=8, tile_batch=3), x * 2, atol=1e-6)
    assert all(shape[-2:] == (32, 32) and shape[0] <= 3 for shape in seen)
    with pytest.raises(ValueError, match="multiple"):
        tiled_apply(model, x, tile=30, overlap=8)
    with pytest.raises(ValueError, match="overlap"):
        tiled_apply(model, x, tile=32, overlap=32)


def test_pad_to_multiple_modes():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    padded, size = pad_to_multiple(x, 8, "replicate")
    assert padded.shape[-2:] == (8, 8) and size == (5, 6)
    assert torch.equal(padded[..., :5, :6], x) and torch.equal(padded[..., 7, 7], x[..., 4, 5])
    reflected, _ = pad_to_multiple(x, 4, "reflect")
    assert torch.equal(reflected[..., 5, :6], x[..., 3, :])  # reflect excludes the edge row
    tiny, _ = pad_to_multiple(torch.rand(1, 3, 2, 2), 8, "reflect")  # falls back to replicate
    assert tiny.shape[-2:] == (8, 8)


def test_psnr_and_ssim_against_direct_formulas():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 24, 24, generator=generator, dtype=torch.float64)
    b = (a + 0.05 * torch.randn(3, 3, 24, 24, generator=generator, dtype=torch.float64)).clamp(0, 1)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    assert torch.allclose(psnr(a, b), 10 * torch.log10(1 / mse))
    for window in ("skimage", "gaussian"):
        assert torch.allclose(ssim(a, a, window=window), torch.ones(3, dtype=torch.float32))
        assert (ssim(a, b, window=window) < 0.99).all()
    q = quantize_8bit(torch.tensor([0.0, 0.5, 1.2, -0.1]))
    assert torch.allclose(q, torch.tensor([0.0, 128 / 255, 1.0, 0.0]))


def test_default_psnr_and_ssim_are_scikit_image_numbers():
    """The evaluation protocol: skimage's SSIM defaults and PSNR on the float values, no 8-bit rounding."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    generator = torch.Generator().manual_seed(1)
    target = torch.rand(2, 3, 37, 53, generator=generator)
    restored = (target + 0.1 * torch.randn(2, 3, 37, 53, generator=generator)).clamp(0, 1)
    values_ssim, values_psnr = ssim(restored, target), psnr(restored, target)
    for index in range(2):
        true, test = (image[index].permute(1, 2, 0).double().numpy() for image in (target, restored))
        assert values_ssim[index].item() == np.float32(structural_similarity(true, test, data_range=1.0,
                                                                             channel_axis=-1))
        assert values_psnr[index].item() == pytest.approx(peak_signal_noise_ratio(true, test, data_range=1.0),
                                                          rel=1e-6)
    gaussian = ssim(restored, target, window="gaussian")
    assert (gaussian - values_ssim).abs().min() > 1e-4  # the named option is another number
    assert (ssim(quantize_8bit(restored), target) != values_ssim).all()  # no rounding inside


def test_ssim_arguments(monkeypatch):
    import sys

    images = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="window must be one of"):
        ssim(images, images, window="box")
    with pytest.raises(ValueError, match="one shape"):
        ssim(images, images[..., :7])
    with pytest.raises(ValueError, match="skimage window needs images of at least 7×7"):
        ssim(images[..., :6, :], images[..., :6, :])
    with pytest.raises(ValueError, match="gaussian window needs images of at least 11×11"):
        ssim(images, images, window="gaussian")
    monkeypatch.setitem(sys.modules, "skimage.metrics", None)  # scikit-image not installed
    with pytest.raises(ImportError, match="pip install scikit-image.*window='gaussian'"):
        ssim(images, images)
    larger = torch.rand(1, 3, 12, 12)
    assert ssim(larger, larger, window="gaussian").item() == pytest.approx(1.0)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "state.pt"
    save_state({"step": 1}, target)
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert load_state(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind
    for garbage in (b"\x80garbage", b"", b"PK\x03\x04 cut short"):  # a pickle opcode, empty, a broken zip
        target.write_bytes(garbage)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ValueError, match="not a readable checkpoint"):
                load_state(target)
        assert not caught, [str(w.message) for w in caught]  # refused before torch guesses a pickle protocol


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    save_state({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(load_state(tmp_path / "rng.pt")["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


class Holder(FrozenHolder):
    def __init__(self):
        super().__init__()
        self.trainable = nn.Linear(2, 2)
        self.hold_frozen("teacher", nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))


def test_frozen_holder_keeps_nets_out_of_state_and_follows_moves():
    holder = Holder()
    assert set(holder.state_dict()) == {"trainable.weight", "trainable.bias"}
    assert len(list(holder.parameters())) == 2
    assert not any(p.requires_grad for p in holder.teacher.parameters())
    holder.train()
    assert holder.training and not holder.teacher.training
    holder.to(torch.float64)
    assert holder.teacher[0].weight.dtype == torch.float64
    assert [name for name, _ in holder.frozen_modules()] == ["teacher"]
    with pytest.raises(TypeError, match="nn.Module"):
        holder.hold_frozen("bad", object())


def test_image_io_round_trip_and_errors(tmp_path):
    image = quantize_8bit(torch.rand(3, 17, 23))
    write_image(tmp_path / "a.png", image)
    assert torch.allclose(read_image(tmp_path / "a.png"), image, atol=1e-6)
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(ValueError, match="bad.png"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="suffix"):
        write_image(tmp_path / "a.xyz", image)
    assert math.isclose(float(read_image(tmp_path / "a.png").max()), float(image.max()), abs_tol=1e-6)


def test_deferred_value_checks_raise_at_the_end_in_call_order(monkeypatch):
    from perceive_components.ops import validation
    from perceive_components.ops.validation import check_images, check_values, deferred_value_checks

    syncs = []
    monkeypatch.setattr(validation, "host_values", lambda stats: syncs.append(tuple(stats.shape)) or stats.tolist())
    good, nan, big = torch.rand(1, 3, 4, 4), torch.full((1, 3, 4, 4), float("nan")), torch.full((1, 3, 4, 4), 2.0)
    ran = []
    with pytest.raises(ValueError, match="first must hold values in"):
        with deferred_value_checks():
            check_images(good, "fine")
            check_images(big, "first")
            with deferred_value_checks():  # nested blocks join the outermost
                check_values(nan, "second")
            ran.append("body")  # the body runs to its end before anything is raised
    assert ran == ["body"] and syncs == [(3, 2)]
    syncs.clear()
    with pytest.raises(ValueError, match="second contains NaN"):
        with deferred_value_checks():
            check_images(good, "fine")
            check_values(nan, "second", value_range=None)
    with pytest.raises(KeyError):  # an error inside the block wins; its queued checks are dropped
        with deferred_value_checks():
            check_images(nan, "dropped")
            raise KeyError("body")
    with deferred_value_checks():
        check_images(good, "fine")
    check_images(good, "outside")  # outside a block every check syncs on its own
    assert syncs == [(2, 2), (1, 2), (2,)]
    with pytest.raises(ValueError, match="outside contains NaN"):
        check_images(nan, "outside")
