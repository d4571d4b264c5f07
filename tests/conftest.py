"""Shared fixtures. Everything here is tiny, random and offline: no test touches the network."""
from __future__ import annotations

import os
import tempfile

# Must happen before huggingface_hub / open_clip / timm are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="perceive-hf-home-"))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_CLIP_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
    quick_gelu=True,
)


def make_tiny_clip(seed: int = 0):
    """A 1.7 M-parameter random open_clip CLIP (32² images, 32-d text width)."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(**TINY_CLIP_CFG).eval()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread (two threads spin against each other and CI jobs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_clip():
    return make_tiny_clip()


@pytest.fixture()
def tiny_perceiver(tiny_clip):
    from perceive_components import QualityPerceiver

    torch.manual_seed(0)
    return QualityPerceiver(clip_model="tiny-test-clip", pretrained=None, n_ctx=4, clip=tiny_clip)
