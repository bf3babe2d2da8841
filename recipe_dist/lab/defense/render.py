"""The defense bench's markdown: the table, the held-out search, the probe. Each renders a
results file (old ones included), so `bench defense --render FILE` reprints any committed table."""

from __future__ import annotations


def probe_markdown(table: dict) -> str:
    """`--probe`'s table: per trigger, the PTM's pooler sign agreement with the target, and the
    victims' (mean over seeds) agreement, margin at the target corner and ASR."""
    ptm = table["models"]["backdoored PTM"]["triggers"]
    lines = [f"Backdoor probe ({table['test']}; each trigger inserted once; victims: the backdoored PTM fine-tuned per seed, "
             f"mean over seeds; the victims' mean margin on clean inputs is {table['summary_clean_margin']:.2f}):", "",
             "| trigger | PTM: pooler signs on target | victim: pooler signs on target | victim: margin at the target corner | victim: ASR |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for t, r in table["summary"].items():
        lines.append(f"| {t} | {ptm[t]['sign_agreement']:.1f}% | {r['sign_agreement']:.1f}% | {r['corner_margin']:.2f} | {r['asr']:.1f} |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    rows = result["rows"]
    base = rows.get("backdoored")
    lines = [
        "| row | id | ACC | AASR | MASR | ΔACC vs backdoored | ‖W‖ last/first (min-max over layers) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rid, r in rows.items():
        s = r["std"]
        delta = f"{r['acc'] - base['acc']:+.2f}" if base else ""
        ratios = list(r["config"].get("norm_ratio", {}).values())
        ratio = f"{min(ratios):.3g}-{max(ratios):.3g}" if ratios else ""
        star = " **(recommended)**" if rid == result.get("recommended") else ""
        # the search setting a row ran at: a small row's (budget, lr) or the selected candidate
        setting = r["config"].get("setting") or r["config"].get("candidate")
        star += f" [`{setting}`]" if setting else ""
        lines.append(f"| {r['label']}{star} | `{rid}` | {r['acc']:.2f} ± {s['acc']:.2f} | {r['aasr']:.2f} ± {s['aasr']:.2f} "
                     f"| {r['masr']:.2f} ± {s['masr']:.2f} | {delta} | {ratio} |")
    seeds = sorted({s for r in rows.values() for s in r["seeds"]})
    lines += ["", f"preset `{result['preset']}`, mean ± sample std over fine-tuning seeds {seeds}; values in percent; "
              f"{result['date']}, {result['machine']}, commit {result['commit'][:10]}; wall time {result['wall_time_s']:.0f} s", ""]
    if result.get("paired"):
        lines += ["Paired AASR differences (recommended − other, per seed; negative means the recommended row has the lower AASR):", "",
                  "| comparison | per seed | mean | sample std |", "| --- | --- | ---: | ---: |"]
        for k, d in result["paired"].items():
            lines.append(f"| {k} | {', '.join(f'{x:+.2f}' for x in d['aasr_diff'])} | {d['mean']:+.2f} | {d['std']:.2f} |")
        lines.append("")
    nt = result.get("neurons")
    if nt:
        lines += [f"Neurons (paper Table 10; `intermediate.dense` at [CLS], activated: > 0 on more than {nt['threshold']:.0%} of "
                  f"{nt['samples']} test sentences, each trigger inserted once, mean over {len(nt['triggers'])} triggers):", "",
                  "| model | poison-only neurons | overlap ratio |", "| --- | ---: | ---: |"]
        for name, m in nt["models"].items():
            lines.append(f"| {name} | {m['mean_poison_only']:.1f} | {m['mean_overlap_ratio']:.3f} |")
        lines.append("")
    fh = result.get("fit_head")
    if fh:
        lines.append(f"MLM head fitted first (`recipe-dist fit-head`): masked-LM loss {fh['before']['loss']:.3f} → {fh['after']['loss']:.3f}, "
                     f"accuracy {fh['before']['accuracy']:.1f}% → {fh['after']['accuracy']:.1f}% ({fh['scored_on']}).")
    lines.append(f"Command: `{result['command']}`")
    return "\n".join(lines) + "\n"


def search_markdown(result: dict) -> str:
    b = result["backdoored"]
    lines = [f"Held-out search ({result['test']}; seeds {result['seeds']}; rule: {result['rule']}):", "",
             "| candidate | trains / regularized | lr | λ | steps | ACC | AASR | MASR | ‖W‖ last/first |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| backdoored, no defense | | | | | {b['acc']:.2f} | {b['aasr']:.2f} | {b['masr']:.2f} | |"]
    for cid, c in result["candidates"].items():
        cfg = c["config"]
        regularized = "FFN in+out" if cfg.get("model", {}).get("regularized") else "FFN in"
        trains = "all" if cfg.get("model", {}).get("trainable") == "all" else "regularized"
        ratios = list(cfg.get("norm_ratio", {}).values())
        # Only the seed-1 search selects for the table (search_file); elsewhere the rule's pick is information.
        pick = "selected" if result["seeds"] == [1] else "the rule's pick on these seeds; the table's selection is seed 1's"
        star = f" **({pick})**" if cid == result.get("selected") else ""
        lines.append(f"| `{cid}`{star} | {trains} / {regularized} | {cfg['optim']['lr']:g} | {cfg['regularizer']['lam']:g} | {cfg['steps']} "
                     f"| {c['acc']:.2f} | {c['aasr']:.2f} | {c['masr']:.2f} | {f'{min(ratios):.3g}-{max(ratios):.3g}' if ratios else ''} |")
    lines += ["", f"{result['date']}, {result['machine']}, commit {result['commit'][:10]}"
              + (f"; command: `{result['command']}`" if result.get("command") else ""), ""]
    return "\n".join(lines)
