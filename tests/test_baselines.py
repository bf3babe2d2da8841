"""Baselines and neuron analysis (method.md sections 4 and 5): activation statistics, Fine-pruning
(FP, FP-GM, FP-GA), Fine-mixing with E-PUR, and `recipe-dist analyze`."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import REPO, run_cli
from recipe_dist.data import synthetic
from recipe_dist.defenses.finemix import epur_scores, keep_mask
from recipe_dist.models import get_family
from recipe_dist.models.base import ModelFamily, NeuronSite
from recipe_dist.neurons import SiteStats, apply_pruning, overlap, prune_selection, record

TINY = REPO / "configs" / "tiny-bert.yaml"


def _stats(means: list[list[float]], positive=None, samples=10) -> list[SiteStats]:
    out = []
    for layer, m in enumerate(means):
        site = NeuronSite(layer, f"l{layer}", f"l{layer}.weight", f"l{layer}.bias")
        pos = torch.tensor(positive[layer]) if positive else torch.zeros(len(m), dtype=torch.long)
        out.append(SiteStats(site, torch.tensor(m) * samples, pos, samples))
    return out


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


# ------------------------------------------------------------------ selection and zeroing


def test_fp_prunes_the_whole_last_layer_and_gm_ga_prune_globally_lowest_first():
    stats = _stats([[0.5, -1.0, 2.0, 0.1], [-2.0, 3.0, -0.5, 0.0]])
    assert prune_selection(stats, "fp") == {1: [0, 1, 2, 3]}
    # 1 layer's worth = 4 neurons, the globally lowest means: -2.0 (L1), -1.0 (L0), -0.5 (L1), 0.0 (L1).
    assert prune_selection(stats, "fp-gm", gm_layers=1.0) == {0: [1], 1: [0, 2, 3]}
    assert prune_selection(stats, "fp-ga", ga_layers=1.5) == {0: [0, 1, 3], 1: [0, 2, 3]}  # 6: then 0.1 and 0.5 (L0)
    assert sum(map(len, prune_selection(stats, "fp-ga", ga_layers=9).values())) == 8  # capped at every neuron


def test_pruning_zeroes_rows_or_conv1d_columns_and_bias_entries_only():
    rows = NeuronSite(0, "a", "a.weight", "a.bias", axis=0)
    cols = NeuronSite(1, "b", "b.weight", None, axis=1)
    state = {"a.weight": torch.ones(4, 3), "a.bias": torch.ones(4), "b.weight": torch.ones(3, 4), "other": torch.ones(2)}
    apply_pruning(state, [rows, cols], {0: [1, 3], 1: [0]})
    assert state["a.weight"][[1, 3]].abs().sum() == 0 and state["a.weight"][[0, 2]].eq(1).all()
    assert state["a.bias"].tolist() == [1, 0, 1, 0]
    assert state["b.weight"][:, 0].abs().sum() == 0 and state["b.weight"][:, 1:].eq(1).all()
    assert state["other"].eq(1).all()


def test_recorder_matches_first_token_pre_activations(tiny_bert_dir):
    from recipe_dist.config import RunConfig

    fam = get_family("bert")
    cfg = RunConfig()
    loaded = fam.load(tiny_bert_dir, cfg)
    texts = synthetic.corpus(24, seed=4)
    batches = [fam.feature_inputs(loaded.processor, texts[i : i + 8], cfg) for i in range(0, 24, 8)]
    stats = record(loaded.model, fam, batches)
    assert [s.site.layer for s in stats] == [0, 1]
    seen = []
    layer0 = loaded.model.bert.encoder.layer[0].intermediate.dense
    h = layer0.register_forward_hook(lambda m, a, o: seen.append(o[:, 0].detach()))
    with torch.no_grad():
        for b in batches:
            loaded.model.bert.eval()(**b)
    h.remove()
    ref = torch.cat(seen)
    assert stats[0].samples == 24
    assert torch.allclose(stats[0].mean, ref.mean(0), atol=1e-5)
    assert torch.equal(stats[0].positive, (ref > 0).sum(0))


def test_overlap_ratio_on_a_hand_built_activation_matrix():
    from recipe_dist.kernels import reference_activation_stats

    site = NeuronSite(0, "l0", "l0.weight", None)
    # 4 samples x 5 neurons at the first token. Clean activates neurons 0, 1, 2 (> 0 on more than half);
    # poisoned activates 1, 3, 4. Overlap {1}: ratio 1/3; poison-only {3, 4}.
    clean = torch.tensor([[1.0, 2.0, 1.0, -1.0, 0.0], [1.0, 1.0, 1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0, 0.0], [-1.0, 1.0, 0.0, -1.0, 0.0]])
    poisoned = torch.tensor([[-1.0, 1.0, 0.0, 1.0, 1.0], [-1.0, 1.0, -1.0, 2.0, 1.0], [1.0, 1.0, 0.0, 1.0, 1.0], [-1.0, -1.0, 0.0, 1.0, -1.0]])

    def stats(act):
        total, positive = reference_activation_stats(act)
        return [SiteStats(site, total, positive, act.shape[0])]

    r = overlap(stats(clean), stats(poisoned), threshold=0.5)
    assert r["overlap_ratio"] == pytest.approx(1 / 3) and r["poison_only"] == 2


def test_a_family_without_neuron_sites_gets_a_clear_error(tiny_bert_dir):
    from recipe_dist.config import RunConfig
    from recipe_dist.models import ModelLoadError
    from recipe_dist.models.mlm import BertFamily

    class NoSites(BertFamily):
        neuron_sites = ModelFamily.neuron_sites  # the base default: no sites declared

    fam = NoSites()
    loaded = fam.load(tiny_bert_dir, RunConfig())
    with pytest.raises(ModelLoadError, match="declares no neuron sites"):
        record(loaded.model, fam, [])


def test_overlap_ratio_and_poison_only_neurons():
    clean = _stats([[0.0] * 4], positive=[[9, 9, 0, 0]])   # activated: 0, 1
    poisoned = _stats([[0.0] * 4], positive=[[9, 0, 9, 9]])  # activated: 0, 2, 3
    r = overlap(clean, poisoned, threshold=0.5)
    assert r["overlap_ratio"] == pytest.approx(1 / 3) and r["poison_only"] == 2
    assert r["layers"][0]["activated_clean"] == 2 and r["layers"][0]["activated_poisoned"] == 3


# ------------------------------------------------------------------ Fine-mixing pieces


def test_keep_mask_keeps_exactly_rho_random_or_the_smallest_deltas():
    delta = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    g = torch.Generator().manual_seed(0)
    assert int(keep_mask(delta, 0.5, "random", g).sum()) == 3
    smallest = keep_mask(delta, 0.5, "smallest_delta", g)
    assert smallest.tolist() == [[True, False, True], [False, True, False]]
    assert not keep_mask(delta, 0.0, "random", g).any() and keep_mask(delta, 1.0, "random", g).all()


def test_epur_score_is_drift_over_log_of_floored_frequency():
    s = epur_scores(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 400.0, 20.0]), 20)
    assert s.tolist() == pytest.approx([1 / torch.log(torch.tensor(20.0)).item(), 1 / torch.log(torch.tensor(400.0)).item(),
                                        2 / torch.log(torch.tensor(20.0)).item()])


# ------------------------------------------------------------------ the commands


@pytest.mark.slow  # a real CLI process: CI-only, to keep the fast lane under 2 minutes
def test_prune_cli_zeroes_the_chosen_neurons_and_loads_like_the_input(tmp_path, tiny_bert_dir):
    out = tmp_path / "fp-gm"
    run_cli(["prune", "--config", TINY, "--model.path", tiny_bert_dir, "--output_dir", out, "--prune.variant=fp-gm",
             "--prune.gm_layers=0.5", "--data.synthetic_samples=256", "--train.global_batch_size=32", "--train.micro_batch_size=32"])
    report = json.loads((out / "prune.json").read_text())
    assert report["pruned"] == 32 == sum(report["pruned_per_layer"].values())  # 0.5 layer of 64 neurons
    before, after = _tensors(tiny_bert_dir), _tensors(out / "model")
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= {f"bert.encoder.layer.{i}.intermediate.dense.{p}" for i in (0, 1) for p in ("weight", "bias")}
    for layer, idx in report["neurons"].items():
        w = after[f"bert.encoder.layer.{layer}.intermediate.dense.weight"]
        assert w[idx].abs().sum() == 0
        keep = [j for j in range(64) if j not in idx]
        assert torch.equal(w[keep], before[f"bert.encoder.layer.{layer}.intermediate.dense.weight"][keep])
    # The lowest-mean neurons were chosen.
    means = torch.tensor([report["mean_activation"][str(i)] for i in (0, 1)]).flatten()
    chosen = torch.zeros(128, dtype=torch.bool)
    for layer, idx in report["neurons"].items():
        chosen[[int(layer) * 64 + j for j in idx]] = True
    assert means[chosen].max() <= means[~chosen].min()


@pytest.mark.slow
def test_activation_statistics_on_two_ranks_zero0_and_zero3_equal_one_process(tmp_path, tiny_bert_dir):
    common = ["prune", "--config", TINY, "--model.path", tiny_bert_dir, "--prune.variant=fp-ga", "--prune.ga_layers=0.5",
              "--data.synthetic_samples=256", "--train.global_batch_size=32", "--train.micro_batch_size=16"]
    run_cli([*common, "--output_dir", tmp_path / "single"])
    for stage in (0, 3):
        run_cli([*common, "--output_dir", tmp_path / f"z{stage}", f"--train.zero_stage={stage}"], nproc=2)
    single, z0, z3 = (json.loads((tmp_path / name / "prune.json").read_text()) for name in ("single", "z0", "z3"))
    assert single["world_size"] == 1 and z0["world_size"] == z3["world_size"] == 2
    assert single["samples"] == z0["samples"] == z3["samples"] == 256  # the ranks' shares add up to the one pass
    for other in (z0, z3):
        assert other["neurons"] == single["neurons"]
        for layer in single["mean_activation"]:
            assert other["mean_activation"][layer] == pytest.approx(single["mean_activation"][layer], abs=1e-5)
        assert _tensors(tmp_path / "single" / "model").keys() == _tensors(tmp_path / "z0" / "model").keys()


@pytest.mark.slow  # end-to-end: CI runs it, the fast lane leaves it out
def test_prune_refuses_a_reused_run_directory(tmp_path, tiny_bert_dir):
    out = tmp_path / "p"
    args = ["prune", "--config", TINY, "--model.path", tiny_bert_dir, "--output_dir", out, "--data.synthetic_samples=64",
            "--train.global_batch_size=32", "--train.micro_batch_size=32", "--prune.variant=fp"]
    run_cli(args)
    proc = run_cli(args, check=False)
    assert proc.returncode == 2 and "recipe-dist: error:" in proc.stderr and str(out) in proc.stderr


def _classifier(tmp_path, ptm):
    """A classifier fine-tuned from `ptm` on the SYNTHETIC tone task, saved by evaluate."""
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in synthetic.sentiment(96, seed=1)))
    run_cli(["evaluate", "--model.path", ptm, "--task.train_file", train, "--task.test_file", train, "--output_dir", tmp_path / "ev",
             "--finetune.epochs=1", "--finetune.batch_size=16", "--finetune.max_length=32", "--finetune.lr=1e-3", "--seeds=1",
             "--save_models=true", "--triggers.words=cf"])
    return tmp_path / "ev" / "seed1" / "model", train


@pytest.mark.slow  # end-to-end: CI runs it, the fast lane leaves it out
def test_finemix_cli_mixes_resets_embeddings_and_scores_with_evaluate(tmp_path, tiny_bert_dir):
    clf, train = _classifier(tmp_path, tiny_bert_dir)
    base = ["finemix", "--model.path", clf, "--finemix.pretrained", tiny_bert_dir, "--finemix.train_file", train]
    # rho = 0 without fine-tuning: every weight with a pre-trained counterpart is the pre-trained one.
    run_cli([*base, "--output_dir", tmp_path / "rho0", "--finemix.rho=0", "--finemix.finetune.epochs=0", "--finemix.epur_topn=0"])
    pre, b, mixed = _tensors(tiny_bert_dir), _tensors(clf), _tensors(tmp_path / "rho0" / "model")
    shared = [k for k in mixed if k in pre and k.startswith("bert.encoder")]
    assert shared and all(torch.equal(mixed[k], pre[k]) for k in shared)
    assert torch.equal(mixed["classifier.weight"], b["classifier.weight"])  # no counterpart: kept
    # rho = 1: the backdoored weights, untouched.
    run_cli([*base, "--output_dir", tmp_path / "rho1", "--finemix.rho=1", "--finemix.finetune.epochs=0", "--finemix.epur_topn=0"])
    same = _tensors(tmp_path / "rho1" / "model")
    assert all(torch.equal(same[k], b[k]) for k in b)
    # E-PUR alone resets exactly the top-N tokens by drift / log(max(freq, 20)), to the pre-trained rows.
    run_cli([*base, "--output_dir", tmp_path / "epur", "--finemix.mix=false", "--finemix.finetune.epochs=0", "--finemix.epur_topn=7"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(clf))
    counts = torch.zeros(len(tok))
    for line in train.read_text().splitlines()[1:]:
        for i in tok(line.split("\t")[0], add_special_tokens=False)["input_ids"]:
            counts[i] += 1
    key = "bert.embeddings.word_embeddings.weight"
    drift = (b[key] - pre[key]).norm(dim=1)
    expect = set(torch.topk(drift / torch.log(counts.clamp_min(20)), 7).indices.tolist())
    got = _tensors(tmp_path / "epur" / "model")[key]
    reset = {i for i in range(len(tok)) if torch.equal(got[i], pre[key][i]) and not torch.equal(b[key][i], pre[key][i])}
    assert reset == expect
    assert all(torch.equal(got[i], b[key][i]) for i in range(len(tok)) if i not in expect)
    # rho = 0.5, E-PUR on 5 tokens, one epoch on the clean subset; then evaluate scores it as it is.
    run_cli([*base, "--output_dir", tmp_path / "fm", "--finemix.rho=0.5", "--finemix.finetune.epochs=1", "--finemix.epur_topn=5",
             "--finemix.finetune.max_length=32", "--finemix.finetune.lr=1e-3"])
    report = json.loads((tmp_path / "fm" / "finemix.json").read_text())
    assert report["mix"]["share_of_deltas_kept"] == pytest.approx(0.5, abs=0.01)
    assert report["epur"]["reset"] == 5 and len(report["finetune_loss"]) == 1
    assert report["choices"]["mask"] == "random" and "classifier.weight" in report["mix"]["kept_from_finetuning"]
    run_cli(["evaluate", "--model.path", tmp_path / "fm" / "model", "--task.train_file", train, "--task.test_file", train,
             "--output_dir", tmp_path / "ev-fm", "--finetune.epochs=0", "--finetune.max_length=32", "--seeds=1", "--triggers.words=cf"])
    assert 0 <= json.loads((tmp_path / "ev-fm" / "eval.json").read_text())["acc"] <= 100
    # A PTM is not a fine-tuned classifier: scoring it "as it is" is refused.
    proc = run_cli(["evaluate", "--model.path", tiny_bert_dir, "--task.train_file", train, "--task.test_file", train,
                    "--output_dir", tmp_path / "ev-bad", "--finetune.epochs=0"], check=False)
    assert proc.returncode == 2 and "finetune.epochs=0" in proc.stderr


def test_analyze_reports_overlap_and_poison_only_before_and_after(tmp_path, tiny_bert_dir):
    clean = tmp_path / "clean.tsv"
    clean.write_text("sentence\n" + "".join(f"{t}\n" for t in synthetic.corpus(40, seed=2)))
    run_cli(["analyze", "--model.path", tiny_bert_dir, "--after", f"same={tiny_bert_dir}", "--clean", clean, "--triggers", "cf,mn",
             "--output_dir", tmp_path / "an", "--max-length", "32"])
    result = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert set(result["models"]) == {"before", "same"} and result["samples"] == 40
    before = result["models"]["before"]
    assert set(before["per_trigger"]) == {"cf", "mn"} and len(before["per_trigger"]["cf"]["layers"]) == 2
    assert before["mean_poison_only"] == result["models"]["same"]["mean_poison_only"]  # same weights, same answer
    assert (tmp_path / "an" / "poison_only.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_dynamics_scores_every_checkpoint_and_the_last_one_is_the_export(tmp_path, tiny_bert_dir, stage):
    run = tmp_path / "purify"
    run_cli(["purify", "--config", TINY, "--model.path", tiny_bert_dir, "--output_dir", run, "--train.max_steps=6",
             "--checkpoint.every_steps=2", "--checkpoint.keep=10", "--data.synthetic_samples=256", f"--train.zero_stage={stage}",
             "--model.trainable=all"])
    train = tmp_path / "task.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in synthetic.sentiment(64, seed=1)))
    out = tmp_path / "dyn"
    run_cli(["dynamics", run, "--config", REPO / "configs" / "eval" / "sst2.yaml", "--output_dir", out,
             "--task.train_file", train, "--task.test_file", train, "--finetune.epochs=1", "--finetune.max_length=32",
             "--finetune.batch_size=16", "--seeds=1", "--triggers.words=cf"])
    result = json.loads((out / "dynamics.json").read_text())
    assert [p["step"] for p in result["points"]] == [0, 2, 4, 6]
    assert (out / "dynamics.png").stat().st_size > 1000
    # The step-6 checkpoint, turned back into a model, is the model purify exported at step 6.
    last, final = _tensors(out / "step_00000006" / "model"), _tensors(run / "model")
    assert last.keys() == final.keys()
    for k in final:
        assert torch.allclose(last[k], final[k], atol=1e-6), k
    first = _tensors(out / "step_00000002" / "model")
    assert any(not torch.equal(first[k], final[k]) for k in final)
    if stage == 0:  # the same output directory for another run: its exports are made again, never reused stale
        run2 = tmp_path / "purify2"
        run_cli(["purify", "--config", TINY, "--model.path", tiny_bert_dir, "--output_dir", run2, "--train.max_steps=6",
                 "--checkpoint.every_steps=2", "--checkpoint.keep=10", "--data.synthetic_samples=256", "--train.seed=7",
                 "--model.trainable=all"])
        run_cli(["dynamics", run2, "--config", REPO / "configs" / "eval" / "sst2.yaml", "--output_dir", out,
                 "--task.train_file", train, "--task.test_file", train, "--finetune.epochs=1", "--finetune.max_length=32",
                 "--finetune.batch_size=16", "--seeds=1", "--triggers.words=cf"])
        last2, final2 = _tensors(out / "step_00000006" / "model"), _tensors(run2 / "model")
        assert all(torch.allclose(last2[k], final2[k], atol=1e-6) for k in final2)
        assert any(not torch.equal(final2[k], final[k]) for k in final)


def test_analyze_refuses_zero_insertions(tmp_path):
    clean = tmp_path / "clean.txt"
    clean.write_text("a clean sentence\n")
    proc = run_cli(["analyze", "--model.path", tmp_path, "--clean", clean, "--insertions", "0", "--output_dir", tmp_path / "an"], check=False)
    assert proc.returncode == 2 and "--insertions: must be >= 1" in proc.stderr and not (tmp_path / "an").exists()


@pytest.mark.slow  # a real CLI process
def test_prune_refuses_a_count_that_would_zero_every_neuron(tmp_path, tiny_bert_dir):
    """FP-GM's BERT default is 4 layers' worth (method.md); on a 2-layer model that is every FFN neuron."""
    out = tmp_path / "fp-gm"
    proc = run_cli(["prune", "--config", TINY, "--model.path", tiny_bert_dir, "--output_dir", out, "--prune.variant=fp-gm",
                    "--data.synthetic_samples=64", "--train.global_batch_size=32", "--train.micro_batch_size=32"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("recipe-dist: error:")][-1]
    assert "prune.gm_layers: 4 layers' worth" in line and "model's 2 FFN layers" in line, line
    assert not (out / "model").exists()
