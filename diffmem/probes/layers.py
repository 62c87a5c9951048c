"""UNet layers by name, and forward hooks that record or block their neurons.

Layer names come from the model (``unet.named_modules()``), never from a hard-coded SD v1.4
list, so the same code runs on the testbed UNet and on SD v1.x / v2.x block layouts:

- :func:`value_layers`: cross-attention value projections ``*.attn2.to_v`` (NeMo's neurons),
  by default in the down and mid blocks.
- :func:`ffn_layers`: the second FFN linear ``*.ff.net.2`` of every transformer block (Wanda).

Every hook is removed when its ``with`` block ends, also on error, so the model is unchanged
afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from diffmem.checks import did_you_mean
from diffmem.errors import ConfigError

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

BLOCK_PREFIXES = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


def _check_blocks(blocks: Sequence[str]) -> tuple[str, ...]:
    unknown = [b for b in blocks if b not in BLOCK_PREFIXES]
    if unknown:
        raise ConfigError(f"unknown block kind(s) {unknown} (known: {', '.join(BLOCK_PREFIXES)})")
    return tuple(BLOCK_PREFIXES[b] for b in blocks)


def _linears(unet: UNet2DConditionModel, suffix: str, blocks: Sequence[str]) -> dict[str, torch.nn.Linear]:
    prefixes = _check_blocks(blocks)
    found = {
        name: m
        for name, m in unet.named_modules()
        if name.endswith(suffix) and name.startswith(prefixes) and isinstance(m, torch.nn.Linear)
    }
    if not found:
        raise ConfigError(f"the UNet has no '*{suffix}' layers in blocks {list(blocks)}")
    return found


def value_layers(unet: UNet2DConditionModel, blocks: Sequence[str] = ("down", "mid")) -> dict[str, torch.nn.Linear]:
    """Cross-attention value projections (``attn2.to_v``) of ``blocks``, in model order."""
    return _linears(unet, "attn2.to_v", blocks)


def ffn_layers(unet: UNet2DConditionModel, blocks: Sequence[str] = ("down", "mid", "up")) -> dict[str, torch.nn.Linear]:
    """Second FFN linears (``ff.net.2``) of every transformer block in ``blocks``, in model order."""
    return _linears(unet, "ff.net.2", blocks)


def get_layers(unet: UNet2DConditionModel, names: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The named linear layers; an unknown name raises ``ConfigError`` with close matches."""
    modules = dict(unet.named_modules())
    out = {}
    for name in names:
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
            raise ConfigError(
                f"the UNet has no linear layer '{name}'{did_you_mean(name, linears, cutoff=0.6, paren=True)}"
            )
        out[name] = module
    return out


@contextlib.contextmanager
def block_neurons(unet: UNet2DConditionModel, neurons: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Zero the listed output channels of the named layers in every forward pass (NeMo's blocking)."""
    handles = []
    try:
        for name, layer in get_layers(unet, list(neurons)).items():
            idx = torch.as_tensor(sorted({int(i) for i in neurons[name]}), dtype=torch.long)
            if idx.numel() == 0:
                continue
            if int(idx.min()) < 0 or int(idx.max()) >= layer.out_features:
                raise ConfigError(f"{name}: neuron index out of range [0, {layer.out_features})")

            def hook(
                _module: torch.nn.Module, _inputs: Any, output: torch.Tensor, idx: torch.Tensor = idx
            ) -> torch.Tensor:
                output = output.clone()
                output[..., idx.to(output.device)] = 0
                return output

            handles.append(layer.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record(
    unet: UNet2DConditionModel,
    names: Sequence[str],
    what: str = "output",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect each named layer's ``output`` (or first ``input``) per forward pass, detached.

    Yields ``{name: [tensor per call]}``; tensors are ``[B, tokens, features]``, or what
    ``reduce`` makes of them (a statistic instead of the activations: bounded memory).
    """
    if what not in ("output", "input"):
        raise ConfigError(f"record: what must be 'output' or 'input' (got {what!r})")
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    try:
        for name, layer in get_layers(unet, names).items():

            def hook(_module: torch.nn.Module, inputs: Any, output: torch.Tensor, name: str = name) -> None:
                x = (output if what == "output" else inputs[0]).detach()
                store[name].append(reduce(x) if reduce is not None else x)

            handles.append(layer.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()
