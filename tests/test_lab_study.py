"""`recipe-dist bench study` (issue 25) end to end on the smoke preset: replicated purifications,
each scored with several fine-tuning seeds, and paired comparisons over purifications; the
held-out phase selects, and the test split is read only after that selection is committed."""

import json
import subprocess

import pytest

from conftest import run_cli
from recipe_dist.lab.stats import paired
from recipe_dist.config import ConfigError
from recipe_dist.errors import RecipeError
from recipe_dist.lab.study import ACC_BUDGET, SELECTION_ROWS, Study, comparisons, headline, pick_rho, select, smoke


def test_pick_rho_takes_the_smallest_rho_within_the_accuracy_budget_else_the_most_accurate():
    victims = 86.0
    # Smallest rho resets the most; it is taken as soon as it is within ACC_BUDGET of the victims.
    assert pick_rho({"0.1": 80.0, "0.3": victims - ACC_BUDGET, "0.5": 85.9, "0.9": 86.1}, victims) == 0.3
    assert pick_rho({"0.9": 85.0, "0.1": 84.5}, victims) == 0.1  # key order does not matter
    # None within: the most accurate, the smaller rho on a tie.
    assert pick_rho({"0.1": 70.0, "0.3": 80.0, "0.5": 80.0, "0.7": 75.0}, victims) == 0.3
    assert pick_rho({"0.5": 10.0}, victims) == 0.5


def _rows(**aasr_acc):
    return {k: {"aasr": a, "acc": c} for k, (a, c) in aasr_acc.items()}


def test_select_takes_the_whole_model_setting_only_when_it_beats_both_and_costs_little():
    rho = {"rho": 0.3}
    base = dict(backdoored=(93.0, 86.0), reference=(57.0, 85.0), recommended_lambda0=(40.0, 85.5))
    assert select(_rows(**base, recommended=(30.0, 84.0)), rho)["recommended"] == "recommended"
    # Not below its own lambda=0 twin: the regularizer did not earn it.
    assert select(_rows(**base, recommended=(45.0, 85.0)), rho)["recommended"] == "reference"
    # Not below the reference budget.
    assert select(_rows(**base, recommended=(58.0, 85.0)), rho)["recommended"] == "reference"
    # Too dear in accuracy (more than ACC_BUDGET below the backdoored model).
    assert select(_rows(**base, recommended=(20.0, 86.0 - ACC_BUDGET - 0.01)), rho)["recommended"] == "reference"
    # Nothing is decided before every row it reads, and Fine-mixing's rho, are there.
    assert not select(_rows(**base, recommended=(30.0, 84.0)), None)["decided"]
    short = select(_rows(backdoored=(93.0, 86.0), reference=(57.0, 85.0)), rho)
    assert not short["decided"] and all(k in short["why"] for k in SELECTION_ROWS if k != "reference")


def _committed(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    git = ["git", "-C", str(path.parent), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", path.name], check=True)
    subprocess.run([*git, "commit", "-qm", "frozen"], check=True)
    return path


def test_the_test_phase_takes_only_its_own_held_out_selection(tmp_path):
    from dataclasses import asdict

    held = smoke()
    record = {"preset": "smoke", "recipe": asdict(held), "selection": {"decided": True, "recommended": "reference", "finemix": {"rho": 0.5}}}
    frozen = _committed(tmp_path / "frozen" / "study.json", json.dumps(record))

    def study(*sets, name="smoke", out=tmp_path / "out"):
        from recipe_dist.lab.stages import set_keys

        return Study(name, set_keys(smoke(), ["split=test", f"selection_file={frozen}", *sets]), out, tmp_path)

    assert study().check_frozen()["selection"]["recommended"] == "reference"
    with pytest.raises(RecipeError, match=r"another recipe \(other purify_seeds\)"):
        study("purify_seeds=1,3").check_frozen()
    with pytest.raises(RecipeError, match="preset 'smoke', not 'minilm-mlm-por'"):
        study(name="minilm-mlm-por").check_frozen()
    # The file the test phase itself writes cannot be the frozen one.
    with pytest.raises(RecipeError, match="the test phase writes OUTPUT/study.json"):
        study(out=frozen.parent).check_frozen()
    # Held-out classifiers are never the reported ones.
    with pytest.raises(ConfigError, match="share a seed"):
        study("selection_seeds=2,12").check_seeds()


def test_a_held_out_phase_adopts_another_attacks_committed_selection_for_the_same_setting(tmp_path):
    """One product setting: BadPre's held-out phase may take POR's frozen choice instead of
    selecting its own; it then decides once Fine-mixing's rho is chosen."""
    from dataclasses import asdict

    from recipe_dist.lab.stages import set_keys

    por = smoke()
    record = {"preset": "minilm-mlm-por", "recipe": asdict(por), "selection": {"decided": True, "recommended": "recommended"}}
    frozen = tmp_path / "frozen" / "por-heldout.json"
    frozen.parent.mkdir()
    frozen.write_text(json.dumps(record))

    def study(*sets):
        return Study("smoke", set_keys(smoke(), [f"selection_from={frozen}", *sets]), tmp_path / "out", tmp_path)

    with pytest.raises(RecipeError, match="not committed"):
        study().check_adopted()
    _committed(frozen, frozen.read_text())
    adopted = study().check_adopted()
    assert adopted["recommended"] == "recommended" and adopted["preset"] == "minilm-mlm-por" and len(adopted["commit"]) == 40
    assert study("split=test").check_adopted() == {}  # the test phase reads its own held-out file only
    with pytest.raises(RecipeError, match="another recommended_setting"):
        study("recommended_setting.optim.lr=3e-4").check_adopted()
    rows = _rows(backdoored=(93.0, 86.0))  # no defense row scored here: the choice is adopted, not made
    assert select(rows, None, adopted) == {"decided": False, "why": "missing: Fine-mixing's rho"}
    sel = select(rows, {"rho": 0.3}, adopted)
    assert sel["decided"] and sel["recommended"] == "recommended" and sel["finemix"] == {"rho": 0.3}
    assert sel["rule"].startswith("adopted from por-heldout.json (minilm-mlm-por, commit ")


def test_comparisons_pair_purifications_by_seed_not_by_position():
    def row(*per):
        return {"per_purification": [{"purify_seed": s, "aasr": a, "acc": 80.0} for s, a in per]}

    rows = {"reference": row((1, 50.0), (2, 60.0), (3, 70.0)), "reference_lambda0": row((3, 75.0), (1, 55.0), (2, 65.0))}
    c = next(c for c in comparisons(rows) if c["metric"] == "aasr")
    assert c["mean_diff"] == pytest.approx(-5.0) and c["ci95"] is None  # -5 on every pair: no spread, no claim
    rows["reference_lambda0"] = row((1, 55.0), (2, 65.0), (4, 75.0))
    with pytest.raises(RecipeError, match="other seeds"):
        comparisons(rows)


def test_headline_puts_each_attacks_selected_row_and_comparisons_side_by_side(tmp_path):
    def row(label, *per, n_finetune=2):
        per = [{"purify_seed": s, "aasr": a, "acc": c} for s, a, c in per]
        return {"label": label, "split": "test", "n_purify": len(per), "n_finetune": n_finetune, "per_purification": per,
                "aasr": sum(p["aasr"] for p in per) / len(per), "acc": sum(p["acc"] for p in per) / len(per), "config": {}}

    def study(attack, recommended, twin_aasr):
        rows = {"clean": row("clean PTM", (0, 16.0, 86.0)), "backdoored": row("backdoored", (0, 95.0, 86.0)),
                "reference": row("reference", (1, 50.0, 85.0), (2, 54.0, 85.5), (3, 58.0, 85.0)),
                "recommended": row("recommended", (1, 20.0, 84.0), (2, 23.0, 84.5), (3, 24.0, 84.0)),
                "recommended_lambda0": row("its twin", *((s, a + twin_aasr, 84.0) for s, a in ((1, 20.0), (2, 23.0), (3, 25.0))))}
        rows["backdoored"]["config"] = {"attack": attack}
        return {"rows": rows, "comparisons": comparisons(rows), "recommended": recommended, "preset": f"p-{attack}", "date": "d",
                "machine": "m", "commit": "c" * 40, "frozen": {"file": "/x/held.json", "commit": "f" * 40, "selection": {}}}

    por, badpre = study("por", "recommended", 10.0), study("badpre", "reference", 0.5)
    text = headline([por, badpre])
    lines = text.splitlines()
    assert lines[0] == "| row | POR ACC | POR AASR | BadPre ACC | BadPre AASR | purifications x fine-tunings |"
    # Each study's selected row comes third, starred: POR's whole-model row, BadPre's reference budget.
    assert lines[4] == "| recommended **(recommended)** | 84.17 | 22.33 | 85.17 | 54.00 | 3 x 2 |"
    # Rows a study does not have are dashes; the reference row is shown once more for POR, not for nothing.
    assert "| reference | 85.17 | 54.00 | 85.17 | 54.00 | 3 x 2 |" in lines
    twin = next(c for c in por["comparisons"] if (c["a"], c["b"], c["metric"]) == ("recommended", "recommended_lambda0", "aasr"))
    cell = f"{twin['mean_diff']:+.2f} [{twin['ci95'][0]:+.2f}, {twin['ci95'][1]:+.2f}], p {twin['p']:.3f}, n 3: established"
    assert cell.startswith("-10.33 [") and f"| selected - twin | aasr | {cell} | - |" in lines  # BadPre's reference has no twin row
    assert "| recommended - reference | aasr |" in text and "frozen in `held.json` at commit ffffffffff" in text
    (tmp_path / "por.json").write_text(json.dumps(por))
    (tmp_path / "badpre.json").write_text(json.dumps(badpre))
    assert run_cli(["bench", "study", "--render", tmp_path / "por.json", tmp_path / "badpre.json"]).stdout == text


@pytest.mark.slow
def test_study_smoke_stops_at_the_attack_gate_then_replicates_purifications_and_compares_them(tmp_path):
    out = tmp_path / "study"
    # An attack below its gate stops the held-out phase before any purification, with the figures.
    proc = run_cli(["bench", "study", "--preset", "smoke", "--output_dir", out, "--set", "gate_aasr=101",
                    "--set", "gate_pooler=0.99"], check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "missed its gate" in last and "gate_aasr 101" in last and "gate_pooler 0.99" in last
    assert (out / "eval-heldout-backdoored" / "eval.json").is_file() and not list(out.glob("reference-s*"))
    assert list(json.loads((out / "study.json").read_text())["rows"]) == ["clean", "backdoored"]  # written before the stop
    # The smoke's own gate (none) then continues from the stages already there.
    proc = run_cli(["bench", "study", "--preset", "smoke", "--output_dir", out])
    assert "attack-por: reusing" in proc.stdout and "eval-heldout-backdoored: reusing" in proc.stdout
    study = json.loads((out / "study.json").read_text())
    assert {"command", "commit", "date", "machine", "recommended", "rows", "comparisons", "selection"} <= set(study)
    rows = study["rows"]
    # The held-out phase scores what its selection reads, nothing more.
    assert list(rows) == ["clean", "backdoored", "reference", "recommended", "recommended_lambda0"]
    for rid, r in rows.items():
        assert r["split"] == "heldout" and r["n_finetune"] == 2
        assert r["per_purification"][0]["seeds"] == [11, 12]  # held-out classifiers are not the reported ones
        assert r["n_purify"] == (1 if rid in ("clean", "backdoored") else 2) == len(r["per_purification"])
        assert all(len(p["per_finetune"]["aasr"]) == 2 for p in r["per_purification"])
    # Each purification is its own stage, trained with its own seed, on data kept apart from the attacker's.
    for s in (1, 2):
        cfg = (out / "configs" / f"recommended_lambda0-s{s}.yaml").read_text()
        assert f"seed: {s}\n" in cfg and "lam: 0.0" in cfg
    assert "seed: 100\n" in (out / "configs" / "attack-por.yaml").read_text()
    # The comparisons are the paired statistics of the per-purification means, as lab/stats computes them.
    c = next(c for c in study["comparisons"] if (c["a"], c["b"], c["metric"]) == ("recommended", "recommended_lambda0", "aasr"))
    want = paired([p["aasr"] for p in rows["recommended"]["per_purification"]], [p["aasr"] for p in rows["recommended_lambda0"]["per_purification"]])
    assert c["mean_diff"] == pytest.approx(want["mean_diff"]) and c["n"] == 2
    # The fine-tuning file excludes the held-out slice, which is the last rows of the training source.
    source = (out / "task-src" / "train.tsv").read_text().splitlines()
    train, held = (out / "task" / "train.tsv").read_text().splitlines(), (out / "task" / "heldout.tsv").read_text().splitlines()
    assert train == source[:-32] and held == [source[0], *source[-32:]]
    assert "| recommended - recommended_lambda0 | aasr |" in proc.stdout
    rendered = run_cli(["bench", "study", "--render", out / "study.json"])
    assert rendered.stdout == (out / "study.md").read_text()
    # The pre-registered selection decided from held-out rows only.
    sel = study["selection"]
    assert sel["decided"] and sel["recommended"] in ("recommended", "reference")
    want = "recommended" if (rows["recommended"]["aasr"] < rows["reference"]["aasr"] and rows["recommended"]["aasr"] < rows["recommended_lambda0"]["aasr"]
                             and rows["backdoored"]["acc"] - rows["recommended"]["acc"] <= 2.0) else "reference"
    assert sel["recommended"] == want == study["recommended"]
    # Fine-mixing's rho from clean held-out accuracy alone (the rule itself: test_pick_rho_*).
    fm = sel["finemix"]
    assert set(fm["heldout_acc"]) == {"0.5"} and fm["victims_heldout_acc"] == rows["backdoored"]["acc"] and fm["rho"] == 0.5
    assert (out / "finemix_epur-rho0.5-s1-v11" / "model").is_dir() and (out / "finemix_epur-rho0.5-s1-v12" / "model").is_dir()
    # Its victims are the backdoored PTM fine-tuned again with the held-out seeds, kept: the same classifiers.
    victims = json.loads((out / "eval-heldout-victims" / "eval.json").read_text())
    assert victims["acc"] == rows["backdoored"]["acc"] and (out / "eval-heldout-victims" / "seed11" / "model").is_dir()
    assert not list(out.glob("eval-test-*")), "the test split was read in the held-out phase"

    # Phase 2: refused without a committed selection; with one, test is scored and its commit recorded.
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    (frozen / "study.json").write_text((out / "study.json").read_text())
    proc = run_cli(["bench", "study", "--preset", "smoke", "--output_dir", out, "--set", "split=test"], check=False)
    assert proc.returncode == 2 and "selection_file" in proc.stderr.strip().splitlines()[-1]
    proc = run_cli(["bench", "study", "--preset", "smoke", "--output_dir", out, "--set", "split=test",
                    "--set", f"selection_file={frozen / 'study.json'}"], check=False)
    assert proc.returncode == 2 and "not committed" in proc.stderr.strip().splitlines()[-1]
    assert not list(out.glob("eval-test-*"))
    _committed(frozen / "study.json", (frozen / "study.json").read_text())
    commit = subprocess.run(["git", "-C", str(frozen), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    proc = run_cli(["bench", "study", "--preset", "smoke", "--output_dir", out, "--set", "split=test",
                    "--set", f"selection_file={frozen / 'study.json'}"])
    final = json.loads((out / "study.json").read_text())
    assert final["frozen"]["commit"] == commit and final["frozen"]["selection"] == sel
    assert all(r["split"] == "test" for r in final["rows"].values()) and list(out.glob("eval-test-*"))
    assert final["rows"]["reference"]["per_purification"][0]["seeds"] == [1, 2]
    # Every row of the table, each defense replicated; the purifications of the held-out phase are reused.
    assert list(final["rows"]) == ["clean", "backdoored", "reference", "reference_lambda0", "recommended", "recommended_lambda0",
                                   "fp_gm", "finemix_epur", "adaptive_backdoored", "adaptive_reference", "adaptive_recommended"]
    assert all(r["n_purify"] == 2 and r["n_finetune"] == 2 for k, r in final["rows"].items() if k not in ("clean", "backdoored", "adaptive_backdoored"))
    assert "reference-s1: reusing" in proc.stdout and "recommended_lambda0-s2: reusing" in proc.stdout
    for s in (1, 2):
        assert f"seed: {s}\n" in (out / "configs" / f"fp_gm-s{s}.yaml").read_text()
        mix = json.loads((out / f"finemix_epur-s{s}-v1" / "finemix.json").read_text())
        assert mix["choices"]["rho"] == sel["finemix"]["rho"]
    assert final["rows"]["finemix_epur"]["config"]["rho"] == sel["finemix"]["rho"]
    adaptive = (out / "configs" / "attack-por-adaptive.yaml").read_text()
    assert "adaptive_lam: 1.0" in adaptive and "seed: 100\n" in adaptive
    assert {c["a"] for c in final["comparisons"]} >= {"reference", "recommended", "fp_gm", "finemix_epur", "adaptive_reference"}

    # Another attack's held-out phase may adopt this frozen selection: it then scores no defense row.
    proc = run_cli(["bench", "study", "--preset", "smoke", "--output_dir", out, "--set", f"selection_from={frozen / 'study.json'}"])
    adopted = json.loads((out / "study.json").read_text())
    assert list(adopted["rows"]) == ["clean", "backdoored"] and "reference-s1" not in proc.stdout
    assert adopted["selection"]["recommended"] == sel["recommended"] and adopted["selection"]["adopted"]["commit"] == commit
    assert adopted["selection"]["finemix"]["rho"] == sel["finemix"]["rho"] and "Selection (held-out, pre-registered rule: adopted from" in proc.stdout
