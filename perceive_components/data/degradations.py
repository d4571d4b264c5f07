"""Synthetic degradations for tests, demos and the noise task (docs/method.md §4).

All functions take clean images ``(B, 3, H, W)`` in [0, 1] and a ``torch.Generator`` for reproducible
randomness, and return degraded images in [0, 1]. Strength 0 leaves the image unchanged.

- ``add_gaussian_noise``: y = clamp(x + σ/255 · n), n ~ N(0, 1)   (σ on the 8-bit scale: 15, 25, 50)
- ``add_haze``:           y = x · t + A · (1 − t), t = exp(−β · d) with a smooth random depth map d
- ``add_rain``:           y = clamp(x + α · streaks), streaks = oriented line kernel ∗ sparse noise
- ``darken``:             y = gain · x^γ   (low light)
- ``blur``:               y = Gaussian blur with std ``sigma`` pixels
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TASKS = ("noise", "haze", "rain", "blur", "lowlight")


def add_gaussian_noise(images: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device="cpu").to(images.device)
    return (images + sigma / 255.0 * noise).clamp(0, 1)


def _smooth_field(shape: tuple[int, int, int, int], scale: int, generator: torch.Generator | None) -> torch.Tensor:
    batch, _, height, width = shape
    coarse = torch.rand(batch, 1, max(height // scale, 2), max(width // scale, 2), generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)


def add_haze(images: torch.Tensor, beta: float, generator: torch.Generator | None = None,
             airlight: float = 0.9) -> torch.Tensor:
    depth = 0.3 + 0.7 * _smooth_field(images.shape, 32, generator).to(images.device)
    transmission = torch.exp(-beta * depth)
    return (images * transmission + airlight * (1 - transmission)).clamp(0, 1)


def _line_kernel(length: int, angle_deg: float) -> torch.Tensor:
    size = length if length % 2 else length + 1
    kernel = torch.zeros(size, size)
    centre = size // 2
    dx, dy = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    for step in torch.linspace(-centre, centre, 4 * size):
        x, y = round(centre + float(step) * dx), round(centre + float(step) * dy)
        kernel[y, x] = 1.0
    return kernel / kernel.sum()


def add_rain(images: torch.Tensor, amount: float, generator: torch.Generator | None = None,
             length: int = 15, angle_deg: float = 70.0, density: float = 0.02) -> torch.Tensor:
    if amount == 0:
        return images.clone()
    batch, _, height, width = images.shape
    drops = (torch.rand(batch, 1, height, width, generator=generator) < density).float()
    kernel = _line_kernel(length, angle_deg)[None, None]
    streaks = F.conv2d(drops, kernel, padding=kernel.shape[-1] // 2)
    streaks = (streaks / streaks.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)).to(images.device)
    return (images + amount * streaks).clamp(0, 1)


def darken(images: torch.Tensor, gain: float, gamma: float = 1.5) -> torch.Tensor:
    return (gain * images.clamp(0, 1).pow(gamma)).clamp(0, 1)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return images.clone()
    radius = max(1, math.ceil(3 * sigma))
    coords = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect" if min(images.shape[-2:]) > radius else "replicate")
    out = F.conv2d(padded, g.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, g.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def degrade(images: torch.Tensor, task: str, severity: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply ``task`` at ``severity`` in [0, 1] (0 = clean, 1 = heavy), mapping it to each task's strength."""
    if task == "noise":
        return add_gaussian_noise(images, 60.0 * severity, generator)
    if task == "haze":
        return add_haze(images, 2.5 * severity, generator)
    if task == "rain":
        return add_rain(images, 0.9 * severity, generator)
    if task == "blur":
        return blur(images, 3.0 * severity)
    if task == "lowlight":
        return darken(images, 1.0 - 0.85 * severity, 1.0 + 1.0 * severity)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
