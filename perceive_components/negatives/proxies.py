"""Proxy negatives computed online: frozen, weaker restorers run on the degraded batch (docs/method.md §2.2).

Each proxy j covers a set of tasks (``None``: all); its output is a negative only for the samples whose
task it covers (mask m_j(b)). A proxy runs only on those samples, without gradients, under autocast
(bf16 on CUDA by default), and its output is clamped to [0, 1]. The proxies are held frozen: not in
``state_dict()``/``parameters()``, always in eval mode, moved by ``.to()``.

When the inputs are fixed files, rendering the proxies once with ``RenderCache`` is far cheaper than
running them at every step.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..data.tasks import TaskLike, TaskVocabulary, as_vocabulary
from ..ops.frozen import FrozenHolder
from ..ops.tiling import pad_to_multiple
from ..ops.validation import check_images, check_positive_int


def resolve_autocast(autocast_dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """``"auto"``: bf16 on CUDA, none elsewhere; ``None``: off; a dtype: that dtype."""
    if autocast_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
        raise ValueError(f"autocast_dtype must be 'auto', None or a torch.dtype, got {autocast_dtype!r}")
    return autocast_dtype


class ProxyNegatives(FrozenHolder):
    """``forward(degraded (B, 3, H, W), labels=None, mask=None) -> (negatives (B, K, 3, H, W), mask (B, K))``.

    Args:
        proxies: name → frozen restorer (``nn.Module`` mapping ``(n, 3, H, W)`` to the same shape).
        tasks: name → the tasks the proxy covers, as names, aliases or ids of ``vocabulary`` (missing or
            ``None``: every task).
        vocabulary: the ``TaskVocabulary`` (default ``STANDARD_TASKS``) shared with the losses and ``RenderCache``.
        autocast_dtype: ``"auto"`` (bf16 on CUDA), ``None`` or a dtype.
        multiple: reflect-pad inputs to this multiple for proxies that need it (cropped back after).

    ``labels``: the batch's tasks, a ``(B,)`` integer tensor of ids or a sequence of names/aliases; an explicit
    ``mask (B, K)`` bool (e.g. "the fold model that did not train on this image") replaces the task rule.
    Entries outside the mask are zeros and never computed.
    """

    def __init__(self, proxies: Mapping[str, nn.Module], tasks: Mapping[str, Iterable[TaskLike] | None] | None = None,
                 *, vocabulary: TaskVocabulary | Sequence[str] | None = None,
                 autocast_dtype: torch.dtype | str | None = "auto", multiple: int = 1) -> None:
        super().__init__()
        if not isinstance(proxies, Mapping) or not proxies:
            raise ValueError("proxies must be a non-empty mapping name -> nn.Module")
        tasks = dict(tasks or {})
        unknown = sorted(set(tasks) - set(proxies))
        if unknown:
            raise ValueError(f"tasks names proxies that do not exist: {unknown}; proxies are {sorted(proxies)}")
        self.vocabulary = as_vocabulary(vocabulary, "vocabulary")
        self.names = tuple(proxies)
        self.tasks = {name: None if tasks.get(name) is None else self.vocabulary.ids(tasks[name])
                      for name in self.names}
        resolve_autocast(autocast_dtype, torch.device("cpu"))  # validate early
        self.autocast_dtype = autocast_dtype
        self.multiple = check_positive_int(multiple, "multiple")
        for index, name in enumerate(self.names):
            self.hold_frozen(f"proxy{index}", proxies[name])

    def proxy(self, name: str) -> nn.Module:
        return getattr(self, f"proxy{self.names.index(name)}")

    def coverage(self, labels: torch.Tensor | Sequence[TaskLike], device: torch.device | None = None
                 ) -> torch.Tensor:
        """``(B, K)`` bool: True where proxy k covers the task of sample b (``labels``: ids or names)."""
        if isinstance(labels, torch.Tensor):
            if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim != 1:
                raise ValueError(f"labels must be integer task ids of shape (B,), got {labels.dtype} "
                                 f"{tuple(labels.shape)}")
            labels = labels.to(device) if device is not None else labels
        else:
            labels = self.vocabulary.labels(labels, device=device)
        columns = []
        for name in self.names:
            covered = self.tasks[name]
            columns.append(torch.ones_like(labels, dtype=torch.bool) if covered is None
                           else torch.isin(labels, torch.tensor(covered, device=labels.device)))
        return torch.stack(columns, dim=1)

    @torch.no_grad()
    def forward(self, degraded: torch.Tensor, labels: torch.Tensor | Sequence[TaskLike] | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(degraded, "degraded")
        batch, _, height, width = degraded.shape
        count = len(self.names)
        if mask is None:
            mask = self.coverage(labels, degraded.device) if labels is not None else \
                torch.ones(batch, count, dtype=torch.bool, device=degraded.device)
        elif mask.dtype != torch.bool or tuple(mask.shape) != (batch, count):
            raise ValueError(f"mask must be a bool tensor of shape (B, K) = ({batch}, {count}), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.to(degraded.device)
        negatives = degraded.new_zeros((batch, count, 3, height, width), dtype=torch.float32)
        dtype = resolve_autocast(self.autocast_dtype, degraded.device)
        for k, name in enumerate(self.names):
            rows = mask[:, k].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue                                       # a masked-out proxy costs nothing
            inputs, size = pad_to_multiple(degraded.index_select(0, rows), self.multiple)
            with torch.autocast(degraded.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                output = self.proxy(name)(inputs)
            if not isinstance(output, torch.Tensor) or output.shape[:2] != (rows.numel(), 3) \
                    or tuple(output.shape[-2:]) != tuple(inputs.shape[-2:]):
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(f"proxy {name!r} must return (n, 3, H, W) = {tuple(inputs.shape)}, got {shape}")
            negatives[rows, k] = output[..., : size[0], : size[1]].float().clamp(0, 1)
        return negatives, mask
