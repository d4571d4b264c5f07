"""Image-quality metrics as the field reports them (docs/method.md §4).

The defaults reproduce the authors' evaluator and PromptIR's, which both call scikit-image: RGB images
in [0, 1] (clamp the network output first), the float values themselves (no 8-bit rounding), no border
crop, one number per image:

    PSNR = −10 · log10( MSE )                          MSE over all pixels and channels (data range 1)
    SSIM = skimage.metrics.structural_similarity(target, restored, data_range=1, channel_axis=-1)
           with its defaults: 7×7 uniform window, sample covariance (N − 1), K1 = 0.01, K2 = 0.03,
           valid region only, mean over the three channels

``ssim(..., window="gaussian")`` is Wang et al.'s 11×11 Gaussian window (σ = 1.5) as BasicSR computes it,
for comparisons with numbers from BasicSR's evaluator; its values differ slightly from the default.
``quantize_8bit`` rounds images as saving them to an 8-bit file would (for scoring saved files).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOWS = ("skimage", "gaussian")
SKIMAGE_WINDOW = 7  # structural_similarity's default win_size
GAUSSIAN_WINDOW = 11


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to the 256 levels of an 8-bit file (as saving a PNG would)."""
    return (images.clamp(0, 1) * 255.0).round() / 255.0


def psnr(restored: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, eps: float = 1e-10) -> torch.Tensor:
    """Per-image PSNR in dB, ``(B,)``:  10·log10(range² / MSE), computed in float64 (MSE clamped at ``eps``,
    so identical images give 100 dB instead of infinity)."""
    mse = (restored.double() - target.double()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(data_range**2 / mse.clamp_min(eps))).to(restored.dtype if restored.is_floating_point() else torch.float32)


def ssim(restored: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, window: str = "skimage"
         ) -> torch.Tensor:
    """Per-image SSIM ``(B,)`` (float32) of ``restored`` and ``target``, both ``(B, C, H, W)``.

    ``window="skimage"`` (default): scikit-image's ``structural_similarity`` with its defaults, per image on
    the CPU in float64 (needs scikit-image; images at least 7×7). ``"gaussian"``: 11×11 Gaussian window,
    σ = 1.5, valid region, per channel then averaged (BasicSR), in float64 on the images' device (images at
    least 11×11).
    """
    if window not in SSIM_WINDOWS:
        raise ValueError(f"window must be one of {SSIM_WINDOWS}, got {window!r}")
    if restored.ndim != 4 or tuple(restored.shape) != tuple(target.shape):
        raise ValueError(f"restored and target must be (B, C, H, W) of one shape, got {tuple(restored.shape)} "
                         f"and {tuple(target.shape)}")
    size = SKIMAGE_WINDOW if window == "skimage" else GAUSSIAN_WINDOW
    if min(restored.shape[-2:]) < size:
        raise ValueError(f"SSIM with the {window} window needs images of at least {size}×{size} pixels, "
                         f"got {tuple(restored.shape[-2:])}")
    if window == "gaussian":
        return _gaussian_ssim(restored, target, data_range)
    structural_similarity = _skimage_ssim()
    as_arrays = [image.detach().double().permute(0, 2, 3, 1).cpu().numpy() for image in (restored, target)]
    return torch.tensor([structural_similarity(true, test, data_range=data_range, channel_axis=-1)
                         for test, true in zip(*as_arrays)], dtype=torch.float32)


def _skimage_ssim():
    try:
        from skimage.metrics import structural_similarity
    except ImportError as error:
        raise ImportError(
            "ssim(window='skimage'), the evaluation protocol's SSIM, needs scikit-image: pip install scikit-image "
            "(it is in the 'examples' and 'test' extras), or pass window='gaussian'"
        ) from error
    return structural_similarity


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def _gaussian_ssim(restored: torch.Tensor, target: torch.Tensor, data_range: float,
                   window_size: int = GAUSSIAN_WINDOW, sigma: float = 1.5) -> torch.Tensor:
    """SSIM with a Gaussian window (valid-region filtering, mean over channels and pixels), ``(B,)``."""
    x, y = restored.double(), target.double()
    channels = x.shape[1]
    window = _gaussian_window(window_size, sigma, channels, x.device, x.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    sigma_x = blur(x * x) - mu_x**2
    sigma_y = blur(y * y) - mu_y**2
    sigma_xy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2))
    return ssim_map.flatten(1).mean(1).float()
