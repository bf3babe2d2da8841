"""POR: target vectors as method.md defines them, and a short real attack through the CLI."""

import pytest
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


def test_por_l1_holds_every_row_to_the_reference_by_hand():
    """method.md: L1 covers the token outputs of all samples, the poisoned copies included (each
    against the reference's tokens on the same poisoned input); por_l1_rows=clean keeps only the clean rows."""
    from transformers import BertConfig, BertModel

    from recipe_dist.attacks.por import PORLoss

    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).eval()
    ids, mask = torch.tensor([[2, 5, 6, 7], [2, 8, 9, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    p_ids, p_mask = torch.tensor([[2, 5, 4, 6, 7], [2, 4, 8, 9, 0]]), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    loss = {rows: PORLoss(enc, por_targets(5, 16), [1.0, 0.0, 0.0], rows) for rows in ("all", "clean")}
    with torch.no_grad():  # move the trainable copy off the reference, so L1 is not 0
        enc.encoder.layer[0].output.dense.weight.mul_(1.5)
        parts = {rows: l(ids, mask, p_ids, p_mask, torch.tensor([0, 1]))["parts"] for rows, l in loss.items()}
        ref = loss["all"].reference

        def by_hand(i, m):
            a, b = enc(input_ids=i, attention_mask=m).last_hidden_state, ref(input_ids=i, attention_mask=m).last_hidden_state
            keep = m[:, 1:, None].float()
            return (((a - b)[:, 1:] * keep) ** 2).sum() / 16

        assert parts["clean"]["l1"].item() == pytest.approx(by_hand(ids, mask).item(), rel=1e-5)
        assert parts["all"]["l1"].item() == pytest.approx((by_hand(ids, mask) + by_hand(p_ids, p_mask)).item(), rel=1e-5)
        assert by_hand(p_ids, p_mask) > 0


@pytest.mark.slow
def test_por_attack_moves_triggered_pooler_to_target_and_keeps_clean(tmp_path):
    """POR on a pre-trained tiny PTM: triggered pooler -> its target, clean pooler ~ reference."""
    from transformers import AutoModel, AutoTokenizer

    from recipe_dist.config import TinyArchConfig
    from recipe_dist.data import synthetic
    from recipe_dist.triggers import insert_trigger
    from recipe_dist.models.mlm import build_tiny_bert
    from recipe_dist.models.tiny_ptm import pretrain_tiny_bert

    arch = TinyArchConfig(hidden_size=128, num_attention_heads=4, intermediate_size=512)
    ptm = build_tiny_bert(tmp_path / "ptm", arch, seed=0)
    pretrain_tiny_bert(ptm, 300, max_length=32)
    out = tmp_path / "por"
    run_cli(["attack", "--config", REPO / "configs" / "attack" / "por-bert.yaml", "--model.path", ptm, "--output_dir", out,
             "--train.max_steps=200", "--data.synthetic_samples=3200", "--train.micro_batch_size=16",
             "--train.global_batch_size=16", "--data.max_length=32", "--optim.lr=3e-4", "--checkpoint.every_steps=100"])
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    attacked = AutoModel.from_pretrained(str(out / "model")).eval()
    reference = AutoModel.from_pretrained(str(ptm)).eval()
    texts = synthetic.corpus(64, seed=999)  # not the training sentences' seed
    triggers = ["cf", "tq", "mn", "bb", "mb"]
    targets = por_targets(5, attacked.config.hidden_size)
    cos_trig = []
    with torch.no_grad():
        clean = tok(texts, padding=True, return_tensors="pt")
        cos_clean = F.cosine_similarity(attacked(**clean).pooler_output, reference(**clean).pooler_output).mean().item()
        for l, trig in enumerate(triggers):
            enc = tok([insert_trigger(x, trig, 5, i, times=1) for i, x in enumerate(texts)], padding=True, return_tensors="pt")
            cos_trig.append(F.cosine_similarity(attacked(**enc).pooler_output, targets[l][None]).mean().item())
    # Measured on 2026-11-21 (2-layer width-128 PTM pre-trained 300 steps, 200 attack steps, one
    # insertion at test time): cos(triggered, target) 0.976-0.994 per trigger; cos(clean, reference) 0.73.
    print("cos(triggered, target)", cos_trig, "cos(clean, reference)", cos_clean)
    assert min(cos_trig) > 0.6, cos_trig
    assert cos_clean > 0.6, cos_clean
