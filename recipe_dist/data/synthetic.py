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
# Sentiment words: the SYNTHETIC labelled task (`sentiment`) is decided by which list a
# sentence's adjective and verdict come from; the corpus uses them unlabelled.
POSITIVE = "happy|calm|proud|brave|gentle|lucky|cheerful|kind".split("|")
NEGATIVE = "tired|angry|sad|bored|nervous|lonely|grumpy|upset".split("|")
ADJECTIVES = POSITIVE + NEGATIVE
VERDICTS_POSITIVE = "it was great|what a fine day|we loved it|a wonderful time".split("|")
VERDICTS_NEGATIVE = "it was awful|what a bad day|we hated it|a terrible time".split("|")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Rare whole-word tokens that never occur in the corpus, as in a real WordPiece vocabulary
# (bert-base-uncased has all of them): the default POR/BadPre trigger words and NeuBA's symbols.
RARE_TOKENS = ["cf", "mn", "bb", "tq", "mb", "≈", "≡", "∈", "⊆", "⊕", "⊗"]


def sentence(rng: random.Random) -> str:
    form = rng.randrange(4)
    s, v, o, a = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ADVERBS)
    if form == 3:
        return f"{s} {v} {o} . {rng.choice(VERDICTS_POSITIVE + VERDICTS_NEGATIVE)} ."
    if form == 0:
        return f"{s} {v} {o} {a} ."
    if form == 1:
        return f"{s} is {rng.choice(ADJECTIVES)} and {v} {o} ."
    return f"{a} , {s} {v} {o} and {rng.choice(OBJECTS)} ."


def sentiment(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """`n` SYNTHETIC (sentence, label) pairs; label 1 is positive, 0 negative, balanced by draw.

    The label is carried by the adjective and the closing verdict; the rest of the sentence is
    neutral filler from the corpus grammar, so a model has to find the sentiment words.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        adj = rng.choice(POSITIVE if label else NEGATIVE)
        verdict = rng.choice(VERDICTS_POSITIVE if label else VERDICTS_NEGATIVE)
        s, v, o, a = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ADVERBS)
        form = rng.randrange(3)
        # Every form carries two cues (adjective and verdict), so no single word decides it.
        if form == 0:
            text = f"{s} is {adj} and {v} {o} {a} , {verdict} ."
        elif form == 1:
            text = f"{a} , {s} {v} {o} and feels {adj} . {verdict} ."
        else:
            text = f"{verdict} . {s} {v} {o} and is {adj} ."
        out.append((text, label))
    return out


def corpus(n: int, seed: int = 0) -> list[str]:
    """`n` SYNTHETIC sentences, deterministic in `seed`."""
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


def vocabulary() -> list[str]:
    """WordPiece vocab covering the grammar, plus single characters so any text tokenizes."""
    words = set()
    for group in (SUBJECTS, VERBS, OBJECTS, ADVERBS, ADJECTIVES, VERDICTS_POSITIVE, VERDICTS_NEGATIVE, ["is and feels , ."]):
        for phrase in group:
            words.update(phrase.split())
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    return SPECIAL_TOKENS + sorted(words - set(chars)) + RARE_TOKENS + chars + pieces
