"""Quiet where it is expected, loud where it is not: transformers' LOAD REPORT through `load_with_summary`."""

from __future__ import annotations

import logging

import pytest

from recipe_dist.models.load_report import load_with_summary

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "was", "good", "bad"]


@pytest.fixture()
def tiny_ptm(tmp_path):
    """A 2-layer, width-32 BertForPreTraining (MLM and NSP heads, pooler) with its tokenizer."""
    import torch
    from transformers import BertConfig, BertForPreTraining, BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    out = tmp_path / "ptm"
    BertForPreTraining(cfg).save_pretrained(str(out))
    BertTokenizer(str(vocab)).save_pretrained(str(out))
    return out


class _Records(logging.Handler):
    """transformers' own log records, whatever stream its handler writes to."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture()
def hf_records():
    handler = _Records()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    yield handler.messages
    root.removeHandler(handler)


def _load(path):
    from transformers import AutoModelForSequenceClassification

    return load_with_summary(AutoModelForSequenceClassification, str(path), num_labels=2, use_safetensors=True)


def test_expected_keys_are_one_line(tiny_ptm, hf_records, capfd):
    model = _load(tiny_ptm)
    assert type(model).__name__ == "BertForSequenceClassification"
    err = capfd.readouterr().err
    assert not [m for m in hf_records if "LOAD REPORT" in m]
    assert "LOAD REPORT" not in err and "UNEXPECTED" not in err and "MISSING" not in err
    summary = [line for line in err.splitlines() if "as expected" in line]
    assert len(summary) == 1, err
    assert "classifier.* newly initialised" in summary[0]
    assert "cls.* unused by the classifier" in summary[0]
    assert "WARNING" not in err


def test_a_missing_encoder_weight_is_loud(tiny_ptm, hf_records, capfd):
    from safetensors.torch import load_file, save_file

    weights = tiny_ptm / "model.safetensors"
    state = load_file(str(weights))
    dropped = "bert.encoder.layer.0.attention.self.query.weight"
    del state[dropped]
    save_file(state, str(weights), metadata={"format": "pt"})

    _load(tiny_ptm)
    err = capfd.readouterr().err
    # The library's full table, as transformers logs it without the helper ...
    reports = [m for m in hf_records if "LOAD REPORT" in m]
    assert len(reports) == 1
    assert "encoder.layer.0.attention.self.query.weight" in reports[0] and "MISSING" in reports[0]
    assert "cls.predictions" in reports[0]  # the expected keys too: it is the unabridged report
    # ... and a warning line of ours naming the key.
    warning = [line for line in err.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "encoder.layer.0.attention.self.query.weight" in warning[0], err
    assert "as expected" not in err
