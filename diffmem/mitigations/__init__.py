"""Mitigations (docs/methods.md section 5): what ``diffmem mitigate`` builds.

``MITIGATIONS.get(kind)(task) -> summary`` (:mod:`~diffmem.mitigations.builders`) for the three
kinds a ``mitigation=`` config names:

- ``adversarial_ft`` (:mod:`~diffmem.mitigations.adversarial`): Finding Dori's adversarial
  fine-tuning against searched triggers;
- ``finetune`` (:mod:`~diffmem.mitigations.finetune`): MemControl's masked PEFT inner loop,
  its full fine-tuning and fixed-LoRA baselines, and the training-time mitigations (caption
  augmentation, GNI, noise-norm filtering);
- ``defence`` (:mod:`~diffmem.mitigations.defences`): inference-time wrappers (Wen's
  embedding minimisation, GNI, random tokens).

Every kind leaves a model folder that all stages load as ``model=local model.path=...``.
"""

from diffmem.registry import Registry

MITIGATIONS = Registry("mitigation kind", expects=callable)
for _name in ("adversarial_ft", "finetune", "defence"):
    MITIGATIONS.register(_name, f"diffmem.mitigations.builders:build_{_name}")

__all__ = ["MITIGATIONS"]
