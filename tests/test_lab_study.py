"""`recipe-dist bench study` (issue 25) end to end on the smoke preset: replicated purifications,
each scored with several fine-tuning seeds, and paired comparisons over purifications."""

import json

import pytest

from conftest import run_cli
from recipe_dist.lab.stats import paired


@pytest.mark.slow
def test_study_smoke_replicates_purifications_and_compares_them(tmp_path):
    out = tmp_path / "study"
    proc = run_cli(["bench", "study", "--preset", "smoke", "--output_dir", out])
    study = json.loads((out / "study.json").read_text())
    assert {"command", "commit", "date", "machine", "recommended", "rows", "comparisons"} <= set(study)
    rows = study["rows"]
    assert list(rows) == ["clean", "backdoored", "reference", "reference_lambda0", "recommended", "recommended_lambda0"]
    for rid, r in rows.items():
        assert r["split"] == "test" and r["n_finetune"] == 2
        assert r["n_purify"] == (1 if rid in ("clean", "backdoored") else 2) == len(r["per_purification"])
        assert all(len(p["per_finetune"]["aasr"]) == 2 for p in r["per_purification"])
    # Each purification is its own stage, trained with its own seed, on data kept apart from the attacker's.
    for s in (1, 2):
        cfg = (out / "configs" / f"reference_lambda0-s{s}.yaml").read_text()
        assert f"seed: {s}\n" in cfg and "lam: 0.0" in cfg
    assert "seed: 100\n" in (out / "configs" / "attack-por.yaml").read_text()
    # The comparisons are the paired statistics of the per-purification means, as lab/stats computes them.
    c = next(c for c in study["comparisons"] if (c["a"], c["b"], c["metric"]) == ("reference", "reference_lambda0", "aasr"))
    want = paired([p["aasr"] for p in rows["reference"]["per_purification"]], [p["aasr"] for p in rows["reference_lambda0"]["per_purification"]])
    assert c["mean_diff"] == pytest.approx(want["mean_diff"]) and c["n"] == 2
    # The fine-tuning file excludes the held-out slice, which is the last rows of the training source.
    source = (out / "task-src" / "train.tsv").read_text().splitlines()
    train, held = (out / "task" / "train.tsv").read_text().splitlines(), (out / "task" / "heldout.tsv").read_text().splitlines()
    assert train == source[:-32] and held == [source[0], *source[-32:]]
    assert "| reference - reference_lambda0 | aasr |" in proc.stdout
    rendered = run_cli(["bench", "study", "--render", out / "study.json"])
    assert rendered.stdout == (out / "study.md").read_text()
