"""Backdoor attacks on PTMs, for building test models (method.md section 2; trigger-phrase is the decoder lab's).

An attack wraps a model family and is a job for the same Trainer as purification: DeepSpeed,
shards, checkpoints, TensorBoard and export all apply. Attacks register as defenses and
families do: one file each, `@register_attack("name", modality)`, and one line in
ATTACK_MODULES; the registry imports those modules on first use.
"""

from __future__ import annotations

import importlib

from ..errors import RecipeError

ATTACK_MODULES = (
    "recipe_dist.attacks.por",
    "recipe_dist.attacks.neuba",
    "recipe_dist.attacks.badpre",
    "recipe_dist.attacks.trigger_phrase",
    "recipe_dist.attacks.neuba_vision",  # neuba on image families (vit, vgg, clip)
)

_ATTACKS: dict[tuple[str, str], type] = {}


def register_attack(name: str, modality: str = "text"):
    """Register an attack job class as attack.name=`name` for families of `modality`."""

    def deco(cls):
        _ATTACKS[(name, modality)] = cls
        return cls

    return deco


def attacks(modality: str = "text") -> list[str]:
    for module in ATTACK_MODULES:
        importlib.import_module(module)
    return sorted(n for n, m in _ATTACKS if m == modality)


def get_attack(name: str, family):
    """The attack job `name` on `family`; a one-line error naming the attacks that family takes."""
    known = attacks(family.modality)
    if name not in known:
        if name in attacks("text"):
            raise RecipeError(f"attack.name: {name} is a text attack; the {family.name} family ({family.modality}) takes "
                              f"{', '.join(known)} (NeuBA-vision: checkerboard patches)")
        raise RecipeError(f"attack.name: unknown attack '{name}' (known: {', '.join(sorted(set(attacks('text')) | set(known)))})")
    return _ATTACKS[(name, family.modality)](family)
