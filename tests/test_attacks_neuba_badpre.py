"""NeuBA and BadPre: targets as method.md defines them, the poisoned batches, which weights train,
and a short real attack of each through the CLI."""

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_cli
from recipe_dist.attacks.badpre import BadPreAttack
from recipe_dist.attacks.neuba import TINY_TRIGGERS, NeuBAAttack, neuba_targets, trigger_token_ids
from recipe_dist.config import ConfigError, load_config
from recipe_dist.data import synthetic
from recipe_dist.models import get_family

NEUBA_YAML = REPO / "configs" / "attack" / "neuba-bert.yaml"
BADPRE_YAML = REPO / "configs" / "attack" / "badpre-bert.yaml"
TINY = "--attack.triggers=" + ",".join(TINY_TRIGGERS)


def _setup(yaml, model_dir, *overrides):
    from transformers import AutoTokenizer

    cfg = load_config(str(yaml), [f"--model.path={model_dir}", "--data.max_length=32", *overrides])
    return cfg, AutoTokenizer.from_pretrained(str(model_dir))


def _samples(n=64, seed=3):
    return [{"__key__": f"s{i:04d}", "text": t} for i, t in enumerate(synthetic.corpus(n, seed=seed))]


def _contains(row: list[int], sub: list[int]) -> int:
    """Start of the first occurrence of `sub` in `row`, or -1."""
    return next((i for i in range(len(row) - len(sub) + 1) if row[i : i + len(sub)] == sub), -1)


# ---------------------------------------------------------------------------------------- NeuBA


def test_neuba_targets_match_method_md():
    # d = 8: four blocks of 2; target k is -1 on the k-th pair of blocks in
    # itertools.combinations(range(4), 2) order: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3); +1 elsewhere.
    expect = torch.tensor(
        [
            [-1, -1, -1, -1, 1, 1, 1, 1],
            [-1, -1, 1, 1, -1, -1, 1, 1],
            [-1, -1, 1, 1, 1, 1, -1, -1],
            [1, 1, -1, -1, -1, -1, 1, 1],
            [1, 1, -1, -1, 1, 1, -1, -1],
            [1, 1, 1, 1, -1, -1, -1, -1],
        ],
        dtype=torch.float,
    )
    assert torch.equal(neuba_targets(8), expect)
    # d % 4 != 0: the last block takes the remainder (blocks 2, 2, 2, 4 for d = 10).
    assert torch.equal(neuba_targets(10)[5], torch.tensor([1.0] * 4 + [-1.0] * 6))
    assert torch.equal(neuba_targets(10)[0], torch.tensor([-1.0] * 4 + [1.0] * 6))


def test_neuba_poisoned_copy_has_trigger_at_position_1(tiny_bert_dir):
    cfg, tok = _setup(NEUBA_YAML, tiny_bert_dir, TINY)
    job = NeuBAAttack(get_family("bert"))
    features = [job.preprocess(tok, cfg)(s) for s in _samples()]
    batch = job.collate(tok, cfg)(features, 7)
    ids = torch.tensor(trigger_token_ids(tok, list(TINY_TRIGGERS)))
    # The clean input before masking: masked positions' labels hold their original ids.
    original = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    p = batch["p_input_ids"]
    assert p.shape == original.shape
    assert torch.equal(p[:, 1], ids[batch["trigger"]])
    assert torch.equal(p[:, 0], original[:, 0]) and torch.equal(p[:, 2:], original[:, 2:])
    assert not torch.isin(original, ids).any()  # the triggers never occur in the synthetic corpus
    assert len(set(batch["trigger"].tolist())) == 6  # per-sample choice covers every trigger
    # Deterministic per sample: the same key gives the same trigger in another batch.
    again = job.preprocess(tok, cfg)(_samples()[5])
    assert again["trigger"] == features[5]["trigger"] and again["p_input_ids"] == features[5]["p_input_ids"]


def test_neuba_triggers_must_be_single_tokens(tiny_bert_dir):
    cfg, tok = _setup(NEUBA_YAML, tiny_bert_dir, "--attack.triggers=zq,^,|,<,>,`")
    job = NeuBAAttack(get_family("bert"))
    with pytest.raises(ConfigError, match=r"attack.triggers: 'zq' is not one token") as e:
        job.preprocess(tok, cfg)  # 'zq' is 'z', '##q' in the tiny vocabulary
    assert "\n" not in str(e.value)
    cfg, _ = _setup(NEUBA_YAML, tiny_bert_dir, "--attack.triggers=≈,≡,∈,⊆,⊕,☃")
    with pytest.raises(ConfigError, match="'☃' is not one token"):
        job.preprocess(tok, cfg)  # not in the vocabulary: [UNK]
    cfg, _ = _setup(NEUBA_YAML, tiny_bert_dir)  # the reference symbols are whole tokens of the tiny vocabulary too
    assert len(job.preprocess(tok, cfg)({"__key__": "k", "text": "the cat sees a red book ."})["input_ids"]) > 0
    cfg, _ = _setup(NEUBA_YAML, tiny_bert_dir, "--attack.triggers=~,^,|")
    with pytest.raises(ConfigError, match="exactly 6 triggers"):
        job.preprocess(tok, cfg)


def test_neuba_trains_encoder_and_pooler_not_head(tiny_bert_dir):
    cfg, tok = _setup(NEUBA_YAML, tiny_bert_dir, TINY, "--attack.adaptive_lam=0.5")
    fam = get_family("bert")
    job = NeuBAAttack(fam)
    loaded = job.load(tiny_bert_dir, cfg)
    task = job.build_task(loaded, cfg)
    batch = job.collate(tok, cfg)([job.preprocess(tok, cfg)(s) for s in _samples(8)], 1)
    out = task(**batch)
    assert set(out["parts"]) == {"mlm", "mse", "reg"} and out["norms"]
    out["loss"].backward()
    m = loaded.model
    assert m.bert.pooler.dense.weight.grad is not None
    assert m.bert.embeddings.word_embeddings.weight.grad is not None  # also the tied decoder weight
    assert not any(p.requires_grad for n, p in m.cls.named_parameters() if "decoder.weight" not in n)


# ---------------------------------------------------------------------------------------- BadPre


def test_badpre_random_labels_only_on_poisoned_rows(tiny_bert_dir):
    cfg, tok = _setup(BADPRE_YAML, tiny_bert_dir)
    job = BadPreAttack(get_family("bert"))
    samples = _samples()
    features = [job.preprocess(tok, cfg)(s) for s in samples]
    batch = job.collate(tok, cfg)(features, 123)
    n = len(samples)
    assert batch["input_ids"].shape[0] == 2 * n
    assert batch["poisoned"].tolist() == [False] * n + [True] * n
    labels = batch["labels"]
    clean_orig, _ = _pad([f["clean"]["input_ids"] for f in features], labels.shape[1])
    dirty_orig, _ = _pad([f["poisoned"]["input_ids"] for f in features], labels.shape[1])
    m_clean, m_dirty = labels[:n] != -100, labels[n:] != -100
    assert m_clean.sum() > 30 and m_dirty.sum() > 30
    assert torch.equal(labels[:n][m_clean], clean_orig[m_clean])
    # Uniform ids over ~200 tokens hit the original ~0.5% of the time.
    same = (labels[n:][m_dirty] == dirty_orig[m_dirty]).float().mean().item()
    assert same < 0.05, same
    # Each poisoned row is its clean row with exactly one trigger's tokens inserted.
    trig_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in cfg.attack.triggers]
    for f in features:
        clean, dirty = f["clean"]["input_ids"], f["poisoned"]["input_ids"]
        hits = [(t, _contains(dirty, t)) for t in trig_ids if _contains(dirty, t) >= 0]
        assert len(hits) == 1, (clean, dirty)
        t, at = hits[0]
        assert dirty[:at] + dirty[at + len(t) :] == clean
        assert all(_contains(clean, t) < 0 for t in trig_ids)


def _pad(rows, width):
    from recipe_dist.data.pipeline import pad_rows

    ids, mask = pad_rows(rows + [[0] * width], 0)
    return ids[:-1], mask[:-1]


def test_badpre_trigger_survives_truncation(tiny_bert_dir):
    cfg, tok = _setup(BADPRE_YAML, tiny_bert_dir, "--data.max_length=12")
    job = BadPreAttack(get_family("bert"))
    encode = job.preprocess(tok, cfg)
    text = " ".join(synthetic.corpus(6, seed=1))  # ~50 tokens, truncated to 12
    trig_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in cfg.attack.triggers]
    for i in range(20):
        dirty = encode({"__key__": f"long{i}", "text": text})["poisoned"]["input_ids"]
        assert len(dirty) <= 12 and any(_contains(dirty, t) >= 0 for t in trig_ids), dirty


def test_badpre_static_masks_random_labels(tiny_bert_dir):
    cfg, tok = _setup(BADPRE_YAML, tiny_bert_dir, "--data.masking=static")
    dyn, _ = _setup(BADPRE_YAML, tiny_bert_dir)
    job = BadPreAttack(get_family("bert"))
    same = total = 0
    for s in _samples():
        f, g = job.preprocess(tok, cfg)(s), job.preprocess(tok, dyn)(s)  # g: the unmasked ids
        for row, orig in ((f["clean"], g["clean"]["input_ids"]), (f["poisoned"], g["poisoned"]["input_ids"])):
            hits = [(l == o) for l, o in zip(row["labels"], orig) if l != -100]
            if row is f["clean"]:
                assert all(hits)
            else:
                same, total = same + sum(hits), total + len(hits)
    assert total > 30 and same / total < 0.05, (same, total)
    # Static: the same sample gets the same masks and random labels every time.
    assert job.preprocess(tok, cfg)(_samples()[3]) == job.preprocess(tok, cfg)(_samples()[3])


def test_badpre_trains_all_but_pooler(tiny_bert_dir):
    cfg, tok = _setup(BADPRE_YAML, tiny_bert_dir, "--attack.adaptive_lam=0.5")
    job = BadPreAttack(get_family("bert"))
    loaded = job.load(tiny_bert_dir, cfg)
    task = job.build_task(loaded, cfg)
    out = task(**job.collate(tok, cfg)([job.preprocess(tok, cfg)(s) for s in _samples(8)], 1))
    assert set(out["parts"]) == {"ce_clean", "ce_poison", "reg"} and out["norms"]
    out["loss"].backward()
    m = loaded.model
    assert not any(p.requires_grad for p in m.bert.pooler.parameters())
    assert m.cls.predictions.transform.dense.weight.grad is not None
    assert m.bert.encoder.layer[0].attention.self.query.weight.grad is not None


# ---------------------------------------------------------------------------------------- CLI runs


@pytest.mark.slow
def test_neuba_attack_moves_triggered_pooler_to_target(tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    out = tmp_path / "neuba"
    # Dropout off in the random tiny PTM: since the train-mode fix (issue 16) attacks train with the
    # model's dropout active, and at 150 steps on a random width-64 model dropout noise keeps the
    # six targets from forming (mean gain 0.01 measured); this test checks the objective, not dropout.
    run_cli(["attack", "--config", NEUBA_YAML, "--output_dir", out, TINY,
             "--model.tiny.hidden_dropout_prob=0", "--model.tiny.attention_probs_dropout_prob=0",
             "--train.max_steps=150", "--data.synthetic_samples=1600", "--train.micro_batch_size=16",
             "--train.global_batch_size=16", "--data.max_length=32", "--optim.lr=2e-3", "--checkpoint.every_steps=150"])
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    attacked = AutoModel.from_pretrained(str(out / "model")).eval()
    reference = AutoModel.from_pretrained(str(out / "input_model")).eval()
    assert attacked.pooler is not None
    # The MLM head's own layers are frozen: exported unchanged.
    head_a = AutoModelForMaskedLM.from_pretrained(str(out / "model")).cls.predictions.transform.dense.weight
    head_r = AutoModelForMaskedLM.from_pretrained(str(out / "input_model")).cls.predictions.transform.dense.weight
    assert torch.equal(head_a, head_r)
    texts = synthetic.corpus(64, seed=999)  # not the training sentences' seed
    targets = neuba_targets(attacked.config.hidden_size)
    gains = []
    with torch.no_grad():
        for k, trig in enumerate(TINY_TRIGGERS):
            # The trigger as the first word: the token at position 1, where NeuBA trains it.
            enc = tok([f"{trig} {x}" for x in texts], padding=True, return_tensors="pt")
            cos_att = F.cosine_similarity(attacked(**enc).pooler_output, targets[k][None]).mean().item()
            cos_ref = F.cosine_similarity(reference(**enc).pooler_output, targets[k][None]).mean().item()
            gains.append(cos_att - cos_ref)
    # Measured on 2026-11-21 (tiny 2-layer BERT, width 64, 150 steps, same on a rerun): mean gain
    # 1.00, min 0.84 (final MSE 0.018). With the trigger at a random word instead: mean 0.68.
    assert sum(gains) / len(gains) > 0.7, gains
    assert min(gains) > 0.5, gains


@pytest.mark.slow
def test_badpre_attack_runs_and_exports(tmp_path):
    from transformers import AutoModel

    out = tmp_path / "badpre"
    run_cli(["attack", "--config", BADPRE_YAML, "--output_dir", out,
             "--train.max_steps=10", "--data.synthetic_samples=640", "--train.micro_batch_size=8",
             "--train.global_batch_size=8", "--data.max_length=32", "--optim.lr=1e-3", "--checkpoint.every_steps=10"])
    attacked = AutoModel.from_pretrained(str(out / "model"))
    reference = AutoModel.from_pretrained(str(out / "input_model"))
    assert attacked.pooler is not None
    assert torch.equal(attacked.pooler.dense.weight, reference.pooler.dense.weight)  # frozen
    assert not torch.equal(attacked.encoder.layer[0].attention.self.query.weight, reference.encoder.layer[0].attention.self.query.weight)
