"""Image-quality metrics with the field's evaluation protocol (SPEC.md §4).

PSNR and SSIM on RGB images in [0, 1], optionally quantised to 8-bit first, no border crop. SSIM uses
the Gaussian window of Wang et al. (11×11, σ = 1.5), per channel, then averaged (as BasicSR does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to the 256 levels of an 8-bit file (as saving a PNG would)."""
    return (images.clamp(0, 1) * 255.0).round() / 255.0


def psnr(restored: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, eps: float = 1e-10) -> torch.Tensor:
    """Per-image PSNR in dB, ``(B,)``:  10·log10(range² / MSE)."""
    mse = (restored.double() - target.double()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(data_range**2 / mse.clamp_min(eps))).to(restored.dtype if restored.is_floating_point() else torch.float32)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(restored: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
         window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM ``(B,)`` (valid-region Gaussian filtering, mean over channels and pixels)."""
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
