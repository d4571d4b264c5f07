"""CoOp-style class-specific prompt context on a frozen open_clip text tower (docs/method.md §1.1).

For each quality tier c the token sequence is ``[SOS] [ctx_1 … ctx_n] [EOT] [pad …]``; the ``n_ctx``
context vectors are free parameters (init N(0, 0.02²)) and the last one starts as CLIP's embedding of
the tier word. The frozen text transformer turns each sequence into a text feature T_c:

    x   = [e(SOS); ctx_c; e(EOT); e(pad)…] + P                     (P: positional embedding)
    T_c = normalize( ln_final( transformer(x, causal mask) )[EOT] @ W_proj )
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _text_module(clip: nn.Module) -> nn.Module:
    """The object that carries the text-tower attributes: the model itself (CLIP) or ``model.text``."""
    text = getattr(clip, "text", None)
    holder = text if isinstance(text, nn.Module) else clip
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    missing = [name for name in needed if getattr(holder, name, None) is None]
    if missing or getattr(holder, "cls_emb", None) is not None:
        raise TypeError(
            f"{type(clip).__name__} has no CoOp-compatible text tower (missing {missing or ['no cls_emb']}); "
            "use an open_clip CLIP with its own text transformer (ViT-B-32-quickgelu, ViT-B-16, ViT-L-14, RN50, …)"
        )
    return holder


class TextEncoder(nn.Module):
    """The frozen text half of an open_clip model, taking token *embeddings* instead of token ids."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        text = _text_module(clip)
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        mask = getattr(text, "attn_mask", None)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.context_length = int(self.positional_embedding.shape[0])
        self.width = int(self.token_embedding.weight.shape[1])

    def forward(self, embeddings: torch.Tensor, eot_index: int) -> torch.Tensor:
        """``embeddings (N, L, width)`` → L2-normalised text features ``(N, embed_dim)``."""
        cast_dtype = self.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + self.positional_embedding.to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask)  # open_clip 3.x takes batch-first input
        x = self.ln_final(x)[:, eot_index]
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        else:
            x = x @ self.text_projection
        return F.normalize(x.float(), dim=-1)


def tier_token_ids(words: Sequence[str], tokenizer) -> list[int]:
    """BPE id of each tier word; ``ValueError`` for a word that is not exactly one token or a repeated one."""
    ids: list[int] = []
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"tier_words must be non-empty strings, got {word!r}")
        tokens = tokenizer.encode(word)
        if len(tokens) != 1:
            raise ValueError(
                f"tier_words: {word!r} is {len(tokens)} BPE tokens in CLIP's tokenizer; each tier word must be "
                "a single token (e.g. 'terrible', 'mediocre', 'excellent')"
            )
        if tokens[0] in ids:  # the tokenizer lowercases: 'Good' and 'good' are one token
            first = words[ids.index(tokens[0])]
            raise ValueError(f"tier_words must be distinct tokens: {first!r} and {word!r} are the same CLIP token "
                             f"(got {tuple(words)!r})")
        ids.append(tokens[0])
    return ids


class PromptLearner(nn.Module):
    """Learnable context ``ctx (n_tiers, n_ctx, width)`` and the fixed SOS/EOT/pad embeddings around it."""

    def __init__(
        self,
        text_encoder: TextEncoder,
        word_ids: Sequence[int],
        n_ctx: int,
        sot_id: int,
        eot_id: int,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        length = text_encoder.context_length
        if n_ctx + 2 > length:
            raise ValueError(f"n_ctx={n_ctx} does not fit CLIP's context length {length} (needs n_ctx + 2 tokens)")
        n_tiers = len(word_ids)
        weight = text_encoder.token_embedding.weight
        ctx = torch.randn(n_tiers, n_ctx, weight.shape[1], dtype=torch.float32) * init_std
        with torch.no_grad():
            ctx[:, -1] = weight[torch.as_tensor(list(word_ids), device=weight.device)].float().cpu()
        self.ctx = nn.Parameter(ctx.to(weight.device))

        ids = torch.zeros(n_tiers, length, dtype=torch.long, device=weight.device)
        ids[:, 0] = sot_id
        ids[:, n_ctx + 1] = eot_id
        with torch.no_grad():
            fixed = text_encoder.token_embedding(ids).float()
        self.register_buffer("token_prefix", fixed[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", fixed[:, n_ctx + 1 :].clone(), persistent=False)
        self.eot_index = n_ctx + 1

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[1]

    def forward(self) -> torch.Tensor:
        """Prompt embeddings ``(n_tiers, context_length, width)``."""
        ctx = self.ctx.to(self.token_prefix.dtype)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
