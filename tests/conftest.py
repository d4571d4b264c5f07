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

@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread (two threads spin against each other and CI jobs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_clip():
    """The library's tiny random CLIP (``perceive_components.tiny``): the one users' smoke tests get too."""
    from perceive_components.tiny import tiny_clip as build

    return build()


@pytest.fixture()
def tiny_perceiver(tiny_clip):
    """Untrained prompts (n_ctx 4) on the shared tiny CLIP; ``from_pretrained`` rebuilds that CLIP by name."""
    from perceive_components import QualityPerceiver
    from perceive_components.tiny import TINY_CLIP_NAME

    torch.manual_seed(0)
    return QualityPerceiver(clip_model=TINY_CLIP_NAME, pretrained=None, n_ctx=4, clip=tiny_clip)
