"""A SYNTHETIC English-like corpus and its WordPiece vocabulary, for runs that must not download.

Nothing here is real data: sentences come from a small template grammar over a fixed word list,
so the embedded default and the tests can run offline. Real auxiliary data comes through shards
(`recipe-dist shards`).
"""

from __future__ import annotations

import random
import string

SUBJECTS = "the cat|a dog|my friend|the teacher|our team|the old man|a young girl|the farmer|his sister|the pilot|a stranger|the doctor".split("|")
VERBS = "sees|likes|finds|builds|paints|reads|carries|watches|follows|answers|opens|cleans|visits|writes|sells|buys".split("|")
OBJECTS = "a red book|the small house|an old letter|the blue car|a long river|the quiet garden|a bright lamp|the wooden door|a cold drink|the green hill|a heavy box|the empty room".split("|")
ADVERBS = "today|slowly|again|at night|in the morning|with care|after school|before dinner|every week|near the sea".split("|")
ADJECTIVES = "happy|tired|calm|angry|proud|curious|brave|gentle|quiet|lucky".split("|")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentence(rng: random.Random) -> str:
    form = rng.randrange(3)
    s, v, o, a = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ADVERBS)
    if form == 0:
        return f"{s} {v} {o} {a} ."
    if form == 1:
        return f"{s} is {rng.choice(ADJECTIVES)} and {v} {o} ."
    return f"{a} , {s} {v} {o} and {rng.choice(OBJECTS)} ."


def corpus(n: int, seed: int = 0) -> list[str]:
    """`n` SYNTHETIC sentences, deterministic in `seed`."""
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


def vocabulary() -> list[str]:
    """WordPiece vocab covering the grammar, plus single characters so any text tokenizes."""
    words = set()
    for group in (SUBJECTS, VERBS, OBJECTS, ADVERBS, ADJECTIVES, ["is and , ."]):
        for phrase in group:
            words.update(phrase.split())
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    return SPECIAL_TOKENS + sorted(words - set(chars)) + chars + pieces
