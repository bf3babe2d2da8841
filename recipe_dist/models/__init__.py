"""Model-family registry (timm's `@register_model`, torchtitan's train specs).

A family knows how to load its models safely, its pre-training loss, which weights the
regularizer reads, which parameters train, and how to export. The trainer never branches on
the family; it asks the registry.
"""

from __future__ import annotations

from typing import Callable

from .base import LoadedModel, ModelFamily, ModelLoadError

_FAMILIES: dict[str, Callable[[], ModelFamily]] = {}


def register_family(name: str):
    def deco(factory: Callable[[], ModelFamily]):
        _FAMILIES[name] = factory
        return factory

    return deco


def get_family(name: str) -> ModelFamily:
    if name not in _FAMILIES:
        import difflib

        near = difflib.get_close_matches(name, list(_FAMILIES), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ModelLoadError(f"model.family: unknown family '{name}' (known: {', '.join(sorted(_FAMILIES))}){hint}")
    return _FAMILIES[name]()


def families() -> list[str]:
    return sorted(_FAMILIES)


from . import mlm  # noqa: E402,F401  (registers bert, roberta)

__all__ = ["LoadedModel", "ModelFamily", "ModelLoadError", "register_family", "get_family", "families"]
