"""L_cl under torch.distributed: a 2-process gloo run on loopback with unequal per-rank batches (3 and 5)
gives the same value and gradients as one process on the concatenated batch (docs/method.md §2.3)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ddp_helpers import free_port
from perceive_components.losses import degradation_contrastive_loss

SPLIT = (3, 5)
# rank 0 holds only task 0: all of its negatives live on rank 1, so they must be gathered
LABELS = torch.tensor([0, 0, 0, 1, 2, 0, 1, 2])
WORLD = len(SPLIT)


def _data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SPLIT), 6, generator=generator, dtype=torch.float64)
    x_view = x + 0.3 * torch.randn(sum(SPLIT), 6, generator=generator, dtype=torch.float64)
    torch.manual_seed(1)
    encoder = nn.Linear(6, 4).double()
    return x, x_view, encoder


def _embed(encoder, x, x_view):
    z, z_view = F.normalize(encoder(x), dim=-1), F.normalize(encoder(x_view), dim=-1)
    z.retain_grad()
    z_view.retain_grad()
    return z, z_view


def _single_process():
    x, x_view, encoder = _data()
    z, z_view = _embed(encoder, x, x_view)
    loss = degradation_contrastive_loss(z, z_view, LABELS)
    loss.backward()
    per_anchor = degradation_contrastive_loss(z.detach(), z_view.detach(), LABELS, reduction="none")
    return dict(loss=loss.detach(), z_grad=z.grad, view_grad=z_view.grad, per_anchor=per_anchor,
                params=[p.grad.clone() for p in encoder.parameters()])


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, x_view, encoder = _data()
        start, stop = sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])
        local = slice(start, stop)
        result = {}
        # 1) plain module, sum semantics: the local anchors get exactly the single-process gradient
        z, z_view = _embed(encoder, x[local], x_view[local])
        loss = degradation_contrastive_loss(z, z_view, LABELS[local], ddp_mean_gradients=False)
        loss.backward()
        result.update(loss=loss.detach(), z_grad=z.grad, view_grad=z_view.grad)
        result["per_anchor"] = degradation_contrastive_loss(z.detach(), z_view.detach(), LABELS[local],
                                                            reduction="none")
        # 2) DDP (gradient averaging) with the default ddp_mean_gradients=True: parameter gradients match
        encoder.zero_grad()
        ddp = nn.parallel.DistributedDataParallel(encoder)
        z, z_view = F.normalize(ddp(x[local]), dim=-1), F.normalize(ddp(x_view[local]), dim=-1)
        # (two forwards under DDP: the second input's graph joins the first before backward)
        degradation_contrastive_loss(z, z_view, LABELS[local]).backward()
        result["params"] = [p.grad.clone() for p in encoder.parameters()]
        # 3) no valid anchor anywhere: 0, still in the graph, and the backward does not hang
        z, z_view = _embed(encoder, x[local], x_view[local])
        empty = degradation_contrastive_loss(z, z_view, torch.zeros(stop - start, dtype=torch.long))
        empty.backward()
        result.update(empty=empty.detach(), empty_requires_grad=empty.requires_grad, empty_grad=z.grad)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.mark.distributed
def test_two_process_gloo_equals_single_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = _single_process()
    for rank, result in enumerate(ranks):
        local = slice(sum(SPLIT[:rank]), sum(SPLIT[: rank + 1]))
        torch.testing.assert_close(result["loss"], single["loss"], rtol=1e-12, atol=1e-12)  # global value on each rank
        torch.testing.assert_close(result["z_grad"], single["z_grad"][local], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result["view_grad"], single["view_grad"][local], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result["per_anchor"], single["per_anchor"][local], rtol=1e-12, atol=1e-12)
        for got, want in zip(result["params"], single["params"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert result["empty"].item() == 0.0 and result["empty_requires_grad"]
        assert result["empty_grad"].abs().sum() == 0
    assert single["z_grad"][:3].abs().sum() > 0  # rank 0's anchors only have negatives from rank 1
