"""Cross-attention probabilities of a UNet while it runs, for the attention-based detectors.

:func:`cross_attention` swaps every cross-attention layer's (``attn2``) processor for
:class:`AttentionProbe`, diffusers' plain ``AttnProcessor`` that hands each layer's
attention probabilities ``[B, heads, queries, tokens]`` to a callback before using them
(the same numbers the layer computes; only the fused SDPA kernel is not used). The original
processors are back when the ``with`` block ends, also on error.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

from diffmem.errors import ConfigError

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

Sink = Callable[[str, torch.Tensor], None]


class AttentionProbe(AttnProcessor):
    """``AttnProcessor`` that passes layer ``name``'s probabilities ``[B, heads, Q, K]`` to ``sink``."""

    def __init__(self, name: str, sink: Sink) -> None:
        super().__init__()
        self.name, self.sink = name, sink

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        compute = attn.get_attention_scores

        def scores(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            probs = compute(query, key, mask)
            self.sink(self.name, probs.unflatten(0, (-1, attn.heads)))  # head_to_batch_dim is batch-major
            return probs

        attn.get_attention_scores = scores  # type: ignore[method-assign,assignment]  # an instance attribute, removed below
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        finally:
            del attn.get_attention_scores


@contextlib.contextmanager
def cross_attention(unet: UNet2DConditionModel, sink: Sink) -> Iterator[list[str]]:
    """Send every cross-attention layer's probabilities to ``sink(name, probs)`` inside the block.

    Yields the probed layer names in model order. Raises ``ConfigError`` for a UNet without
    ``attn2`` layers.
    """
    original = dict(unet.attn_processors)
    names = [k.removesuffix(".processor") for k in original if k.endswith("attn2.processor")]
    if not names:
        raise ConfigError("the UNet has no cross-attention layers (attn2): attention detectors need them")
    probes = {f"{n}.processor": AttentionProbe(n, sink) for n in names}
    unet.set_attn_processor({k: probes.get(k, v) for k, v in original.items()})
    try:
        yield names
    finally:
        unet.set_attn_processor(dict(original))


def token_distribution(probs: torch.Tensor) -> torch.Tensor:
    """``[B, heads, Q, K]`` -> ``[B, K]``: the attention over tokens averaged over heads and queries."""
    return probs.float().mean(dim=(1, 2))


def entropy(dist: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last axis of probability rows (``0 log 0 = 0``)."""
    dist = dist.float()
    return -(dist * torch.log(dist.clamp_min(1e-30))).sum(dim=-1)


def token_map(probs: torch.Tensor, token: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, h, w]``: each row's attention to its ``token`` (index per row), averaged over heads,
    laid out on the layer's square grid and resized bilinearly to the latent ``size``."""
    maps = probs.float().mean(dim=1)[torch.arange(probs.shape[0], device=probs.device), :, token.to(probs.device)]
    side = math.isqrt(maps.shape[1])
    if side * side != maps.shape[1]:
        raise ConfigError(f"cross-attention over {maps.shape[1]} queries is not a square latent grid")
    grid = maps.reshape(-1, 1, side, side)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0]
