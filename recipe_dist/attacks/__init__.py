"""Backdoor attacks on PTMs, for building test models (method.md section 2; trigger-phrase is the decoder lab's).

An attack wraps a model family and is a job for the same Trainer as purification: DeepSpeed,
shards, checkpoints, TensorBoard and export all apply.
"""

from __future__ import annotations

from ..errors import RecipeError
from .badpre import BadPreAttack
from .neuba import NeuBAAttack
from .por import PORAttack
from .trigger_phrase import TriggerPhraseAttack

ATTACKS = {"por": PORAttack, "neuba": NeuBAAttack, "badpre": BadPreAttack, "trigger-phrase": TriggerPhraseAttack}


def get_attack(name: str, family):
    if name not in ATTACKS:
        raise RecipeError(f"attack.name: unknown attack '{name}' (known: {', '.join(sorted(ATTACKS))})")
    if family.modality != "text":
        if name != "neuba":
            raise RecipeError(f"attack.name: {name} is a text attack; the {family.name} family ({family.modality}) takes neuba "
                              "(NeuBA-vision: checkerboard patches)")
        from .neuba_vision import NeuBAVisionAttack

        return NeuBAVisionAttack(family)
    return ATTACKS[name](family)
