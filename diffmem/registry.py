"""Name -> implementation registries with lazy imports and "did you mean" errors."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from diffmem.checks import did_you_mean
from diffmem.errors import ConfigError


class Registry:
    """Maps names to ``"module:attr"`` / ``"module"`` targets (imported on first use) or objects.

    >>> FEATURES = Registry("features", expects=Extractor)
    >>> FEATURES.register("pixel", "diffmem.features.pixel:PixelExtractor")

    ``expects`` (a class, or the builtin ``callable``) is what :meth:`get` must return: a
    subclass of that class, or any callable; a target of another type is a ``ConfigError``.
    """

    def __init__(self, kind: str, expects: type | Callable[[Any], bool] | None = None) -> None:
        self.kind = kind
        self.expects = expects
        self._entries: dict[str, Any] = {}  # as registered
        self._loaded: dict[str, Any] = {}  # lazy targets, once imported

    def register(self, name: str, target: Any | None = None) -> Any:
        """Register ``target`` (an object or a lazy ``"module:attr"`` string) under ``name``.

        Without ``target`` returns a decorator.
        """
        if target is None:

            def deco(obj: Any) -> Any:
                self.register(name, obj)
                return obj

            return deco
        if name in self._entries and self._entries[name] is not target:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = target
        return target

    def names(self) -> list[str]:
        return sorted(self._entries)

    def targets(self) -> dict[str, Any]:
        """Name -> registered target as given (lazy ``"module:attr"`` strings not imported)."""
        return dict(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Any:
        """The registered object; a clear error with close matches for an unknown name."""
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} '{name}'.{did_you_mean(name, self._entries, n=3)} "
                f"Known: {', '.join(self.names())}"
            )
        target = self._loaded.get(name, self._entries[name])
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = importlib.import_module(module)
            target = getattr(target, attr) if attr else target
            self._loaded[name] = target
        self._check(name, target)
        return target

    def _check(self, name: str, target: Any) -> None:
        """A ``ConfigError`` unless ``target`` is what this registry ``expects``."""
        exp = self.expects
        if exp is None:
            return
        if isinstance(exp, type):
            ok, wanted = isinstance(target, type) and issubclass(target, exp), f"a subclass of {exp.__name__}"
        else:
            ok, wanted = bool(exp(target)), getattr(exp, "__name__", "valid")
        if not ok:
            raise ConfigError(f"{self.kind} '{name}' is registered as {target!r}, which is not {wanted}")

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``get(name)(*args, **kwargs)``."""
        return self.get(name)(*args, **kwargs)


#: Model-folder wrapper formats :func:`diffmem.loading.load_model` recognises: name -> a
#: reader ``(folder) -> (base model, sampler hooks)``, or None for a folder of another
#: format. The package root (``diffmem/__init__.py``) registers the defence format, so that
#: loading (data and models layer) imports no method (docs/architecture.md section 3).
MODEL_WRAPPERS = Registry("model wrapper", expects=callable)
