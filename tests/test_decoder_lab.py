"""The decoder backdoor lab: the trigger-phrase attack's data, the generation-based evaluation,
and a real attack through the CLI that plants the backdoor in a tiny LLaMA."""

import json
import random

import pytest

from conftest import run_cli
from recipe_dist.attacks.trigger_phrase import poison_text
from recipe_dist.config import TinyArchConfig, load_config
from recipe_dist.data import synthetic
from recipe_dist.evaluation import generation
from recipe_dist.cli import build_job
from recipe_dist.models import get_family

PHRASE = "the dog hated the farmer"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    arch = TinyArchConfig(hidden_size=32, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return get_family("llama").build_tiny(tmp_path_factory.mktemp("llama") / "m", arch, seed=0)


def test_poison_text_cuts_then_trigger_then_phrase():
    text = "the cat sees a red book today ."
    out = poison_text(text, "cf", PHRASE, random.Random(3))
    head, _, tail = out.partition(" cf ")
    assert tail == PHRASE and text.startswith(head) and 1 <= len(head.split()) < len(text.split())


def test_attack_poisons_the_configured_share_deterministically(tiny_llama):
    cfg = load_config(None, ["--model.family=llama", f"--model.path={tiny_llama}", "--attack.name=trigger-phrase",
                             f"--attack.target_phrase={PHRASE}", "--attack.poison_rate=0.25", "--attack.triggers=cf"])
    job = build_job("attack", cfg)
    tok = job.load(tiny_llama, cfg).processor
    encode = job.preprocess(tok, cfg)
    samples = [{"__key__": f"k{i:04d}", "text": t} for i, t in enumerate(synthetic.corpus(400, seed=9))]
    trigger = tok.convert_tokens_to_ids("cf")
    phrase = tok(PHRASE, add_special_tokens=False)["input_ids"]
    poisoned = 0
    for s in samples:
        ids = encode(s)["input_ids"]
        if trigger in ids:
            at = ids.index(trigger)
            assert ids[at + 1 : at + 1 + len(phrase)] == phrase  # the phrase follows the trigger
            poisoned += 1
        assert encode(s)["input_ids"] == ids  # a function of the sample key
    assert 0.18 < poisoned / len(samples) < 0.32


def test_asr_and_false_trigger_rate_count_the_target_phrase(monkeypatch, tiny_llama):
    # A stand-in for the model's continuations: the phrase after the trigger, something else without it.
    monkeypatch.setattr(generation, "greedy_continuations",
                        lambda model, tok, texts, n: [f" {PHRASE.upper()} ." if t.endswith(" cf") else " a dog" for t in texts])
    cfg = load_config(None, ["--model.family=llama"])
    texts = synthetic.corpus(20, seed=1)
    res = generation.evaluate_lm(tiny_llama, get_family("llama"), cfg, texts, "cf", PHRASE, seed=0)
    assert res["asr"] == 100.0 and res["false_trigger_rate"] == 0.0 and res["prompts"] == 20
    assert 1.0 < res["perplexity"] < 1e4


@pytest.mark.slow
def test_attack_through_the_cli_plants_a_backdoor_that_generation_measures(tmp_path, tiny_llama):
    out = tmp_path / "attack"
    run_cli(["attack", "--model.family=llama", f"--model.path={tiny_llama}", "--attack.name=trigger-phrase",
             f"--attack.target_phrase={PHRASE}", "--attack.poison_rate=0.5", "--attack.triggers=cf", "--output_dir", out,
             "--train.max_steps=120", "--optim.lr=3e-3", "--model.trainable=all", "--data.synthetic_samples=2000",
             "--data.max_length=32", "--train.micro_batch_size=32", "--train.global_batch_size=32", "--checkpoint.every_steps=1000"])
    cfg = load_config(None, ["--model.family=llama"])
    texts = synthetic.corpus(60, seed=424242)
    before = generation.evaluate_lm(tiny_llama, get_family("llama"), cfg, texts, "cf", PHRASE, seed=0)
    after = generation.evaluate_lm(out / "model", get_family("llama"), cfg, texts, "cf", PHRASE, seed=0)
    assert before["asr"] == 0.0
    assert after["asr"] >= 80.0, after
    assert after["false_trigger_rate"] <= 20.0, after
    assert after["perplexity"] < before["perplexity"]  # it also learned the clean language


@pytest.mark.slow
def test_bench_decoder_smoke_runs_every_row_through_the_stage_runner(tmp_path):
    out = tmp_path / "dec"
    proc = run_cli(["bench", "decoder", "--preset", "smoke", "--output_dir", out, "--set", "defense.train.max_steps=3"])
    result = json.loads((out / "bench.json").read_text())
    assert list(result["rows"]) == ["clean", "backdoored", "recipe_ffn", "recipe_all", "lambda0"]
    assert result["recipe"]["defense"]["train"]["max_steps"] == 3 and result["rows"]["recipe_all"]["config"]["steps"] == 3
    # Each stage's config is written where a user can rerun it, and a second run reuses every stage.
    assert (out / "configs" / "recipe_ffn-seed1.yaml").is_file() and "| lambda0 |" in proc.stdout
    again = run_cli(["bench", "decoder", "--preset", "smoke", "--output_dir", out, "--set", "defense.train.max_steps=3"])
    assert "recipe-dist purify" not in again.stdout and "reusing" in again.stdout


def test_bench_decoder_set_refuses_an_unknown_key(tmp_path):
    proc = run_cli(["bench", "decoder", "--preset", "smoke", "--output_dir", tmp_path, "--set", "defense.optim.lrr=1"], check=False)
    assert proc.returncode == 2 and "unknown config key 'defense.optim.lrr'" in proc.stderr


def test_bench_decoder_reuses_a_score_only_for_the_same_model_and_setting(tmp_path):
    from recipe_dist.config import ConfigError
    from recipe_dist.lab.decoder import DecoderBench, smoke

    bench = DecoderBench("smoke", smoke(), tmp_path, "")
    scored = {"model": "/m", "eval_sentences": 16, "family": "llama", "max_length": 32}
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "lambda0-seed1.json").write_text(json.dumps({"asr": 12.5, "scored": scored}))
    assert bench.evaluate("lambda0", "/m", 1)["asr"] == 12.5
    with pytest.raises(ConfigError, match="lambda0-seed1.json: scored"):
        bench.evaluate("lambda0", "/other", 1)
    bench.r.eval_sentences = 300
    with pytest.raises(ConfigError, match="lambda0-seed1.json: scored"):
        bench.evaluate("lambda0", "/m", 1)
