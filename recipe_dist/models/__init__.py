"""Model-family registry (timm's `@register_model`, torchtitan's train specs).

A family is one file: a `ModelFamily` subclass decorated with `@register_family("name")`, the
only place its name is written. The registry knows the modules that hold families
(`FAMILY_MODULES`) and imports them in that order when a family is first asked for, stopping at
the module that registers it, so registration never depends on what happened to be imported and a
text job never pays for importing timm, torchvision and open_clip (about 3 s of start-up, once
per process, per stage and per rank). Adding a family is one file plus one line here.
"""

from __future__ import annotations

import importlib

from .base import LoadedModel, ModelFamily, ModelLoadError, NeuronSite

FAMILY_MODULES = (
    "recipe_dist.models.mlm",  # bert, roberta
    "recipe_dist.models.causal_lm",  # gpt2, llama
    "recipe_dist.models.timm_vision",  # vit, vgg (the vision extra)
    "recipe_dist.models.clip",  # clip through open_clip (the vision extra)
)

_FAMILIES: dict[str, type[ModelFamily]] = {}


def register_family(name: str):
    """Class decorator: registers the family under `name` and sets its `name` attribute."""

    def deco(cls: type[ModelFamily]) -> type[ModelFamily]:
        if name in _FAMILIES and _FAMILIES[name] is not cls:
            raise ValueError(f"model family {name!r} registered twice ({_FAMILIES[name].__module__} and {cls.__module__})")
        cls.name = name
        _FAMILIES[name] = cls
        return cls

    return deco


def _load_all() -> None:
    for module in FAMILY_MODULES:
        importlib.import_module(module)


def get_family(name: str) -> ModelFamily:
    for module in FAMILY_MODULES:
        if name in _FAMILIES:
            break
        importlib.import_module(module)
    if name not in _FAMILIES:
        import difflib

        near = difflib.get_close_matches(name, list(_FAMILIES), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ModelLoadError(f"model.family: unknown family '{name}' (known: {', '.join(sorted(_FAMILIES))}){hint}")
    return _FAMILIES[name]()


def families() -> list[str]:
    _load_all()
    return sorted(_FAMILIES)


__all__ = ["LoadedModel", "ModelFamily", "ModelLoadError", "NeuronSite", "register_family", "get_family", "families"]
