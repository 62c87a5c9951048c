"""Probes of where memorisation lives (docs/methods.md sections 3 and 4).

``PROBES.get(name)(ctx, settings) -> (tables, metrics)``: ``trigger_search`` (Finding Dori's
embedding-space triggers), ``nemo`` (memorisation neurons), ``wanda`` (pruning),
``locality`` (are a memorised image's triggers and masks local?) and ``finding_dori`` (the
paper's table: original vs NeMo vs Wanda, each under trigger search), in
:mod:`~diffmem.probes.studies`. Library pieces: :mod:`~diffmem.probes.context` (the probe
context, the trigger-search attack and its summaries, settings checks: what other stages
use), :mod:`~diffmem.probes.layers` (layer names from the model, hooks),
:mod:`~diffmem.probes.trigger`, :mod:`~diffmem.probes.nemo`, :mod:`~diffmem.probes.wanda`.
"""

from diffmem.registry import Registry

PROBES = Registry("probe", expects=callable)
for _name in ("trigger_search", "nemo", "wanda", "locality", "finding_dori"):
    PROBES.register(_name, f"diffmem.probes.studies:{_name}")

__all__ = ["PROBES"]
