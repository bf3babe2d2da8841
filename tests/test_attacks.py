"""POR: target vectors as method.md defines them, and a short real attack through the CLI."""

import torch
import torch.nn.functional as F

from conftest import REPO, run_cli
from recipe_dist.attacks.por import mse_sum, por_targets


def test_por_targets_match_method_md():
    t = por_targets(5, 8, scale=10.0)
    # trigger l of n: -1 everywhere except the first floor(d/(n-1))*(l-1) = 2*(l-1) dims, times 10.
    expect = -10 * torch.ones(5, 8)
    for l in range(1, 6):
        expect[l - 1, : 2 * (l - 1)] = 10
    assert torch.equal(t, expect)
    assert torch.equal(por_targets(3, 7)[1], 10 * torch.tensor([1, 1, 1, -1, -1, -1, -1.0]))


def test_mse_sum_by_hand():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert mse_sum(a, b).item() == (1 + 4) / 2 + (1 + 1) / 2


def test_por_attack_moves_triggered_pooler_to_target(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from recipe_dist.data import synthetic
    from recipe_dist.evaluation.triggers import insert_trigger

    out = tmp_path / "por"
    run_cli(["attack", "--config", REPO / "configs" / "attack" / "por-bert.yaml", "--output_dir", out,
             "--train.max_steps=120", "--data.synthetic_samples=1920", "--train.micro_batch_size=16",
             "--train.global_batch_size=16", "--data.max_length=32", "--optim.lr=3e-4", "--checkpoint.every_steps=60"])
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    attacked = AutoModel.from_pretrained(str(out / "model")).eval()
    reference = AutoModel.from_pretrained(str(out / "input_model")).eval()
    texts = synthetic.corpus(64, seed=999)  # not the training sentences' seed
    triggers = ["cf", "tq", "mn", "bb", "mb"]
    targets = por_targets(5, attacked.config.hidden_size)
    gains = []
    with torch.no_grad():
        for l, trig in enumerate(triggers):
            enc = tok([insert_trigger(x, trig, 5, i, times=1) for i, x in enumerate(texts)], padding=True, return_tensors="pt")
            cos_att = F.cosine_similarity(attacked(**enc).pooler_output, targets[l][None]).mean().item()
            cos_ref = F.cosine_similarity(reference(**enc).pooler_output, targets[l][None]).mean().item()
            gains.append(cos_att - cos_ref)
    # Measured on 2026-11-21 (tiny 2-layer BERT, 120 steps): mean gain ~0.55, best trigger ~1.0.
    assert sum(gains) / len(gains) > 0.3, gains
    assert max(gains) > 0.7, gains
