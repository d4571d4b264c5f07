"""Explicit guidance under DistributedDataParallel: 2 gloo processes on loopback, each with half of the batch,
``guidance = ddp.module.guide(...)`` outside DDP's forward and ``ddp(x, guidance=guidance)`` inside it, give the
loss and the gradients of one process on the whole batch (L1 + 0.1·L_cl with all-rank negatives), with
``find_unused_parameters=False`` over two steps (a parameter without a gradient would make step 2 fail)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ddp_helpers import free_port
from perceive_components import PerceiveAdapter, QualityAwareLoss
from perceive_components.tiny import tiny_sgm
from test_adapter import ConcatUNet

WORLD = 2
LABELS = torch.tensor([0, 1, 2, 0])  # every anchor has negatives, some only on the other rank


def _setup():
    torch.manual_seed(0)
    adapter = PerceiveAdapter(ConcatUNet(), sgm=tiny_sgm(blocks=3), zero_init=False).double()
    generator = torch.Generator().manual_seed(1)
    degraded = torch.rand(4, 3, 32, 32, generator=generator, dtype=torch.float64)
    positive = torch.rand(4, 3, 32, 32, generator=generator, dtype=torch.float64)
    clean = torch.rand(4, 3, 32, 32, generator=generator, dtype=torch.float64)
    criterion = QualityAwareLoss(None, clip_weight=0, perceptual_weight=0)
    return adapter, criterion, degraded, positive, clean


def _step(model: nn.Module, guide_with: nn.Module, criterion, degraded, positive, clean, labels):
    guidance = guide_with.guide(degraded, positive=positive)
    restored = model(degraded, guidance=guidance)
    loss, _ = criterion(restored, clean, degraded, guidance=guidance, labels=labels)
    loss.backward()
    return loss.detach()


def _single_process():
    adapter, criterion, degraded, positive, clean = _setup()
    loss = _step(adapter, adapter, criterion, degraded, positive, clean, LABELS)
    return loss, {name: p.grad.clone() for name, p in adapter.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        adapter, criterion, degraded, positive, clean = _setup()
        ddp = nn.parallel.DistributedDataParallel(adapter, find_unused_parameters=False)
        local = slice(2 * rank, 2 * rank + 2)
        args = (degraded[local], positive[local], clean[local], LABELS[local])
        loss = _step(ddp, ddp.module, criterion, *args)
        grads = {name: p.grad.clone() for name, p in adapter.named_parameters()}
        ddp.zero_grad()
        _step(ddp, ddp.module, criterion, *args)  # a second step: DDP checks the first reduction finished
        torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.mark.distributed
def test_two_process_ddp_with_explicit_guidance_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single_loss, single_grads = _single_process()
    losses = []
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        losses.append(result["loss"])
        assert set(result["grads"]) == set(single_grads)
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, single_grads[name], rtol=1e-6, atol=1e-9, msg=name)
    # each rank's loss is its half's L1 + λ1·L_cl of its anchors; their mean is the whole batch's
    torch.testing.assert_close(sum(losses) / WORLD, single_loss, rtol=1e-9, atol=1e-12)
    assert any(grad.abs().sum() > 0 for name, grad in single_grads.items() if name.startswith("perceive.cfe"))
