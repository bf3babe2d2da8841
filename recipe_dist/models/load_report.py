"""transformers' LOAD REPORT, cut to one line when it holds only what is expected.

Loading a checkpoint into another head (a PTM as a sequence classifier, a *ForPreTraining
directory as *ForMaskedLM) leaves some weights missing or unused by design; transformers prints
a full table for them on every load, which buries a run's own progress. Families load through
`load_with_summary`: the expected keys become one line, anything else stays loud.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Callable


def _stderr(msg: str) -> None:
    print(f"[recipe-dist] {msg}", file=sys.stderr, flush=True)


# Loading a pre-trained encoder as a sequence classifier, these weights are missing or unused by
# design: the new head is initialised for fine-tuning; the pre-training heads (BERT's cls.*,
# RoBERTa's lm_head.*) and a pooler the classifier does not read (RoBERTa's) stay unused.
# A newly initialised pooler is NOT in the list: the attacks studied here plant the backdoor in it.
NEW_HEAD = (r"classifier\.",)
PRETRAINING_HEADS = (r"cls\.", r"lm_head\.", r"(\w+\.)?pooler\.")


class _HoldLoadReport(logging.Filter):
    """Holds back transformers' LOAD REPORT records; every other record passes."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        # The tie warning comes with a missing head (cls.predictions.bias and its decoder alias
        # both absent): part of the same report, released with it when anything is unexpected.
        message = record.getMessage()
        if "LOAD REPORT" in message or "seem corrupted" in message:
            self.held.append(record)
            return False
        return True


def _group(keys: set[str], patterns: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(`prefix.*` of each pattern that matched some key, the keys no pattern matches)."""
    groups, rest = set(), []
    for key in sorted(keys):
        m = next((m for m in (re.match(p, key) for p in patterns) if m), None)
        if m:
            groups.add(m.group(0) + "*")
        else:
            rest.append(key)
    return sorted(groups), rest


def load_with_summary(
    model_cls: Any,
    path: str,
    *,
    expected_missing: tuple[str, ...] = NEW_HEAD,
    expected_unused: tuple[str, ...] = PRETRAINING_HEADS,
    role: str = "the classifier",
    log: Callable[[str], None] | None = None,
    **kwargs: Any,
):
    """`model_cls.from_pretrained(path, **kwargs)`, with transformers' LOAD REPORT cut to one line
    when every missing weight matches `expected_missing` and every unused one `expected_unused`
    (regexes matched at the start of the key).

    Anything else, a missing encoder weight, an unused one or a shape mismatch, is loud: the
    library's full report is logged as it would have been, and `log` gets a WARNING line naming
    the keys. `role` names what the loaded model is for, in that line. `log` defaults to stderr.
    """
    from transformers.utils import logging as hf_logging

    log = log or _stderr  # (compared by identity below)
    # The report is a warning from this logger (transformers.utils.loading_report.log_state_dict_report).
    hf_logger = hf_logging.get_logger("transformers.modeling_utils")
    hold = _HoldLoadReport()
    hf_logger.addFilter(hold)
    loaded = False
    try:
        model, info = model_cls.from_pretrained(path, output_loading_info=True, **kwargs)
        loaded = True
    finally:
        hf_logger.removeFilter(hold)
        if not loaded:
            # A failed load (e.g. a size mismatch) points at "the above report": show it.
            for record in hold.held:
                hf_logger.handle(record)

    new, missing = _group(set(info["missing_keys"]), expected_missing)
    unused, extra = _group(set(info["unexpected_keys"]), expected_unused)
    mismatched = sorted(k for k, *_ in info["mismatched_keys"])
    name = type(model).__name__
    if missing or extra or mismatched:
        for record in hold.held:
            hf_logger.handle(record)
        problems = [f"{what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''} ({len(keys)})"
                    for what, keys in (("missing, newly initialised", missing), ("unused", extra), ("shape mismatch", mismatched)) if keys]
        log(f"WARNING: {name} from {path}: weights other than the expected ones: {'; '.join(problems)}")
    elif new or unused:
        parts = [f"{', '.join(new)} newly initialised"] if new else []
        parts += [f"{', '.join(unused)} unused by {role}"] if unused else []
        if log is not _stderr or os.environ.get("RANK", "0") == "0":  # every rank loads the same: rank 0 says it
            log(f"{name} from {path}: {'; '.join(parts)}, as expected")
    return model
