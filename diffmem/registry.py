"""Name -> implementation registries with lazy imports and "did you mean" errors."""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

from diffmem.errors import ConfigError


class Registry:
    """Maps names to ``"module:attr"`` / ``"module"`` targets (imported on first use) or objects.

    >>> FEATURES = Registry("features")
    >>> FEATURES.register("pixel", "diffmem.features.pixel:PixelExtractor")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, target: Any | None = None) -> Callable | Any:
        """Register ``target`` (an object or a lazy ``"module:attr"`` string) under ``name``.

        Without ``target`` returns a decorator.
        """
        if target is None:
            def deco(obj):
                self.register(name, obj)
                return obj
            return deco
        if name in self._entries and self._entries[name] is not target:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = target
        return target

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Any:
        """The registered object; a clear error with close matches for an unknown name."""
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self._entries, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} '{name}'.{hint} Known: {', '.join(self.names())}"
            )
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = importlib.import_module(module)
            target = getattr(target, attr) if attr else target
            self._entries[name] = target
        return target

    def build(self, name: str, *args, **kwargs) -> Any:
        """``get(name)(*args, **kwargs)``."""
        return self.get(name)(*args, **kwargs)
