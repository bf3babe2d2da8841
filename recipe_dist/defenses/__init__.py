"""Defenses: one file each, registered with `@register_defense("command")`.

A training defense (RECIPE's `purify`) is a Trainer job (recipe_dist.jobs.FamilyJob); one that
does not train through the Trainer (pruning, mixing) has `run(cfg) -> dict` instead. The
registry imports the modules in DEFENSE_MODULES on first use, so a new defense is one file plus
one line there.
"""

from __future__ import annotations

import importlib

DEFENSE_MODULES = (
    "recipe_dist.defenses.recipe",  # purify
    "recipe_dist.defenses.prune",  # prune (fp, fp-gm, fp-ga)
    "recipe_dist.defenses.finemix",  # finemix
)

_DEFENSES: dict[str, type] = {}


def register_defense(command: str):
    def deco(cls):
        cls.name = command
        _DEFENSES[command] = cls
        return cls

    return deco


def get_defense(command: str, family):
    """The defense job registered as `command`, on `family`; KeyError if there is none."""
    for module in DEFENSE_MODULES:
        importlib.import_module(module)
    return _DEFENSES[command](family)


def defenses() -> list[str]:
    for module in DEFENSE_MODULES:
        importlib.import_module(module)
    return sorted(_DEFENSES)
