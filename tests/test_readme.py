"""The README is checked like code (issue 26): its length, the paths it names, the commands it
shows, and the headline table, which is generated from a committed results file. The lab's
results page (`recipe_dist/lab/results/README.md`) is held to its files the same way.

`python tests/test_readme.py --write` regenerates the headline table in README.md after the
results file or its renderer changed.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "recipe_dist" / "lab" / "results"
RESULTS_PAGE = RESULTS / "README.md"
MAX_LINES = 450

# The headline: the rows of the fitted-head MiniLM study a user needs, in this order, plus the
# one paired comparison the README's reading leans on.
HEADLINE_JSON = RESULTS / "minilm-por.json"
HEADLINE_ROWS = ["clean", "backdoored", "recipe_selected", "lambda0_selected", "recipe_on_clean_selected", "recipe", "lambda0",
                 "pooler_reset", "fp_gm", "finemix"]
HEADLINE_PAIRED = "recipe_selected-vs-lambda0_selected"
HEADLINE_BEGIN, HEADLINE_END = "<!-- headline:begin -->", "<!-- headline:end -->"

# Results-page blocks whose marker is not the name of their file.
BLOCK_FILES = {"minilm-por-confirm": "minilm-por-search-s1-2-3"}

# README commands the tests run as written; only the run directory moves to tmp_path.
TINY_PURIFY = "recipe-dist purify --config configs/tiny-bert.yaml --output_dir runs/tiny-bert"
SLURM_DRY_RUN = ("recipe-dist slurm submit --config configs/tiny-bert.yaml --nodes 2 --ntasks-per-node 1 --time 00:10:00 "
                 "--output_dir runs/slurm-tiny --dry-run")

# A path into the repository: what the README names in backticks, links or code blocks.
PATH_RE = re.compile(r"(?<![\w/.$-])((?:configs|slurm|launch|recipe_dist|tests|\.ci)/[\w./*{},-]*)")
OPTION_RE = re.compile(r"(?<![\w=./-])--[A-Za-z][\w.-]*")


# ---------------------------------------------------------------- the headline table

def headline_markdown(result: dict) -> str:
    """The README's headline block: the lab's own table renderer on HEADLINE_ROWS, then its source."""
    from recipe_dist.lab.defense import markdown

    rows = {rid: result["rows"][rid] for rid in HEADLINE_ROWS}
    table = markdown({**result, "rows": rows, "paired": None, "neurons": None, "fit_head": None})
    table = table[: table.index("\n\n")]  # the rows only: the footer below is the headline's
    p = result["paired"][HEADLINE_PAIRED]
    fh = result["fit_head"]
    seeds = sorted({s for r in rows.values() for s in r["seeds"]})
    return "\n".join([
        table,
        "",
        f"Paired AASR difference, recommended − its λ=0 twin (`{HEADLINE_PAIRED}`), per seed: "
        f"{', '.join(f'{x:+.2f}' for x in p['aasr_diff'])} (mean {p['mean']:+.2f}, sample std {p['std']:.2f}).",
        "",
        f"MiniLM-L6 with only its MLM head fitted (masked-LM accuracy {fh['before']['accuracy']:.1f}% → "
        f"{fh['after']['accuracy']:.1f}%), POR; preset `{result['preset']}`, SST-2 dev, fine-tuning seeds {seeds}, "
        f"mean ± sample std in percent; {result['date']}, {result['machine']}, commit {result['commit'][:10]}; "
        f"from `{HEADLINE_JSON.relative_to(REPO)}`.",
    ]) + "\n"


def marked_block(text: str, begin: str, end: str) -> str:
    """The text between the one `begin` line and the one `end` line."""
    assert text.count(begin) == 1 and text.count(end) == 1, f"expected one {begin} and one {end}"
    return text.split(begin + "\n", 1)[1].split(end, 1)[0]


# ---------------------------------------------------------------- reading markdown

def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)


def inline_spans(text: str) -> list[str]:
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def link_targets(text: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:|#", t)]


def missing_paths(text: str, base: Path) -> list[str]:
    """Repository paths named in backticks or code blocks (from the repo root) and relative links
    (from `base`) that do not exist; a glob or brace pattern must match something."""
    named = [m for chunk in code_blocks(text) + inline_spans(text) for m in PATH_RE.findall(chunk)]
    missing = []
    for path in named:
        path = path.rstrip(".,")
        for alt in _braces(path):
            if not glob.glob(str(REPO / alt)):
                missing.append(path)
    for target in link_targets(text):
        if not (base / target.split("#")[0]).exists():
            missing.append(target)
    return sorted(set(missing))


def _braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m or ".." in m.group(1):
        return [re.sub(r"\{[^{}]*\}", "*", path)]
    return [alt for part in m.group(1).split(",") for alt in _braces(path[: m.start()] + part + path[m.end():])]


def command_lines(text: str) -> list[str]:
    """Every shell command of the code blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            lines += [part.strip() for part in line.split("&&") if part.strip()]
    return lines


def invocations(text: str, inline: bool = True) -> list[tuple[tuple[str, ...], str]]:
    """(command path, the invocation as written) for every `recipe-dist ...` the text shows, in
    code blocks or inline; `launch/local.sh N CMD` counts as `recipe-dist CMD`."""
    found = []
    for line in command_lines(text) + [s for s in inline_spans(text) if inline and s.startswith("recipe-dist ")]:
        words = line.split()
        while words and re.match(r"[A-Z_]+=", words[0]):
            words = words[1:]
        if words[:1] == ["recipe-dist"]:
            words = words[1:]
        elif words[:1] == ["launch/local.sh"] and len(words) > 2:
            words = words[2:]
        else:
            continue
        if not words or not re.match(r"[a-z][\w|-]*$", words[0]):
            continue  # `recipe-dist COMMAND --help`, `recipe-dist --help`
        for command in words[0].split("|"):
            path = (command,)
            if command in ("slurm", "bench") and len(words) > 1 and re.match(r"[a-z][\w|-]*$", words[1]):
                found += [((command, sub), line) for sub in words[1].split("|")]
                continue
            found.append((path, line))
    return found


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("recipe-dist")
    cmd = [exe] if exe else [sys.executable, "-m", "recipe_dist"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)  # a command's help, once per test process: the README shows some commands many times
def help_text(path: tuple[str, ...]) -> str:
    proc = run_cli([*path, "--help"], timeout=120)
    assert proc.returncode == 0, f"recipe-dist {' '.join(path)} --help exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


def unknown_options(path: tuple[str, ...], line: str) -> list[str]:
    """Options of `line` that `recipe-dist PATH --help` does not list. `slurm submit` passes the
    run's config overrides on to the command it submits (purify by default)."""
    known = help_text(path)
    if path == ("slurm", "submit"):
        m = re.search(r"--command[ =](\S+)", line)
        known += help_text((m.group(1) if m else "purify",))
    return [opt for opt in OPTION_RE.findall(line) if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w.-])", known)]


def readme_text() -> str:
    return README.read_text()


# ---------------------------------------------------------------- the README

def test_readme_is_at_most_450_lines():
    n = len(readme_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; move lab material to {RESULTS_PAGE.relative_to(REPO)}"


def test_every_repo_path_the_readme_names_exists():
    assert missing_paths(readme_text(), REPO) == []


@pytest.mark.slow  # several CLI processes: CI runs it, the fast lane leaves it out
def test_every_command_the_readme_shows_answers_help_with_its_options():
    calls = invocations(readme_text())
    assert {p for p, _ in calls} >= {("purify",), ("fit-head",), ("shards",), ("evaluate",), ("report",), ("slurm", "submit")}
    bad = {line: unknown for path, line in calls if (unknown := unknown_options(path, line))}
    assert bad == {}


def test_every_command_of_the_cli_is_in_the_readme():
    proc = run_cli(["--help"])
    assert proc.returncode == 0, proc.stderr
    # `recipe-dist --help` lists one command per line under "commands:", each with a summary.
    listing = proc.stdout.split("commands:", 1)[1]
    commands = [line.split()[0] for line in listing.splitlines() if line.startswith("  ") and line.split()]
    assert {"purify", "evaluate", "shards", "slurm", "demo", "bench"} <= set(commands), proc.stdout
    mentioned = {p[0] for p, _ in invocations(readme_text())} | set(re.findall(r"`([a-z][\w-]*)`", readme_text()))
    assert sorted(set(commands) - mentioned) == []


@pytest.mark.slow  # several CLI processes: CI runs it, the fast lane leaves it out
def test_the_tiny_purify_runs_as_written_and_writes_what_the_readme_lists(tmp_path):
    text = readme_text()
    assert TINY_PURIFY in command_lines(text), "the README no longer shows the tiny purify; update this test"
    out = tmp_path / "tiny-bert"
    args = shlex.split(TINY_PURIFY.replace("runs/tiny-bert", str(out)))[1:]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = text.split("`output_dir` receives:", 1)[1].split("\n\n", 2)[1]
    listed = [p for row in table.splitlines()[2:] for p in re.findall(r"`([^`]+)`", row.split("|")[1])]
    assert "model/" in listed and "summary.json" in listed
    assert [p for p in listed if not glob.glob(str(out / p))] == []
    assert (out / "model" / "model.safetensors").is_file()


def test_the_slurm_dry_run_runs_as_written_and_submits_nothing():
    assert SLURM_DRY_RUN in command_lines(readme_text()), "the README no longer shows the dry run; update this test"
    out = REPO / "runs" / "slurm-tiny"
    existed = out.exists()
    proc = run_cli(shlex.split(SLURM_DRY_RUN)[1:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "#SBATCH --nodes=2" in proc.stdout and "#SBATCH --ntasks-per-node=1" in proc.stdout
    assert existed or not out.exists()


def test_the_headline_table_is_rendered_from_its_json():
    block = marked_block(readme_text(), HEADLINE_BEGIN, HEADLINE_END)
    expected = headline_markdown(json.loads(HEADLINE_JSON.read_text()))
    assert block == expected, "the headline table is stale: python tests/test_readme.py --write"


def test_the_readme_says_which_study_the_headline_is():
    text = readme_text()
    assert "fitted-head MiniLM study" in text and "issue 25" in text
    assert "tanh limit" not in text and "lower on every seed" not in text


# ---------------------------------------------------------------- the results page

def results_blocks() -> dict[str, str]:
    text = RESULTS_PAGE.read_text()
    names = re.findall(r"^<!-- ([\w.-]+):start -->$", text, re.M)
    return {name: marked_block(text, f"<!-- {name}:start -->", f"<!-- {name}:end -->") for name in names}


def test_every_result_file_is_on_the_results_page_as_committed():
    blocks = results_blocks()
    files = {name: BLOCK_FILES.get(name, name) for name in blocks}
    assert sorted(files.values()) == sorted(p.stem for p in RESULTS.glob("*.md") if p.name != "README.md")
    stale = [name for name, stem in files.items() if blocks[name].rstrip("\n") != (RESULTS / f"{stem}.md").read_text().rstrip("\n")]
    assert stale == []
    text = RESULTS_PAGE.read_text()
    assert [p.name for p in sorted(RESULTS.glob("*.json")) if p.name not in text] == []


def test_every_path_on_the_results_page_exists():
    assert missing_paths(RESULTS_PAGE.read_text(), RESULTS) == []


def test_the_results_page_commands_answer_help_with_their_options():
    # Code blocks only: the inline commands beside each table record what ran then, in that day's syntax.
    calls = invocations(RESULTS_PAGE.read_text(), inline=False)
    assert len(calls) >= 10
    bad = {line: unknown for path, line in calls if (unknown := unknown_options(path, line))}
    assert bad == {}


def test_the_results_page_anchors_lead_to_its_headings():
    text = RESULTS_PAGE.read_text()
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M)
    slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
    assert sorted(set(re.findall(r"\]\(#([^)]+)\)", text)) - slugs) == []


@pytest.mark.slow  # several CLI processes: CI runs it, the fast lane leaves it out
def test_the_render_commands_on_the_results_page_give_its_tables():
    renders = [line for line in command_lines(RESULTS_PAGE.read_text()) if "--render" in line]
    assert len(renders) >= 4
    blocks = {BLOCK_FILES.get(name, name): block for name, block in results_blocks().items()}
    for line in renders:
        proc = run_cli(shlex.split(line)[1:], timeout=120)
        assert proc.returncode == 0, f"{line}: {proc.stderr[-2000:]}"
        stem = Path(shlex.split(line)[-1]).stem
        assert blocks[stem].startswith(proc.stdout.rstrip("\n")), line


def test_the_vision_and_decoder_tables_render_from_their_json():
    from recipe_dist.lab import decoder, vision

    for module, stem in [(vision, "vision"), (decoder, "decoder-llama")]:
        rendered = module.markdown(json.loads((RESULTS / f"{stem}.json").read_text()))
        assert (RESULTS / f"{stem}.md").read_text().startswith(rendered.rstrip("\n")), stem


def test_the_results_page_keeps_the_issue_26_corrections():
    text = RESULTS_PAGE.read_text()
    probe = json.loads((RESULTS / "minilm-por-probe.json").read_text())
    ptm = probe["models"]["backdoored PTM"]["triggers"].values()
    lo, hi = min(t["pooler_abs"] for t in ptm), max(t["pooler_abs"] for t in ptm)
    assert f"{lo:.2f}-{hi:.2f}" in text  # the recorded |pooler|, short of tanh's 1
    assert "sit at the tanh limit, so" not in text and "already sit at their target corners" not in text


# ---------------------------------------------------------------- the checks themselves can fail

def test_the_checks_catch_a_broken_readme(tmp_path):
    text = ("`configs/tiny-bert.yaml` `configs/no-such.yaml` [x](recipe_dist/nowhere.md)\n"
            "```\nrecipe-dist purify --config configs/tiny-bert.yaml --no.such_key 1 --output_dir x\n```\n")
    assert missing_paths(text, REPO) == ["configs/no-such.yaml", "recipe_dist/nowhere.md"]
    [(path, line)] = invocations(text)
    assert path == ("purify",) and unknown_options(path, line) == ["--no.such_key"]
    assert missing_paths("`recipe_dist/lab/results/*.json` `recipe_dist/lab/results/{tiny,vision}.json`", REPO) == []
    result = json.loads(HEADLINE_JSON.read_text())
    result["rows"]["recipe_selected"]["aasr"] += 1
    assert headline_markdown(result) != marked_block(readme_text(), HEADLINE_BEGIN, HEADLINE_END)


def write_headline() -> None:
    text = readme_text()
    old = marked_block(text, HEADLINE_BEGIN, HEADLINE_END)
    new = headline_markdown(json.loads(HEADLINE_JSON.read_text()))
    README.write_text(text.replace(f"{HEADLINE_BEGIN}\n{old}{HEADLINE_END}", f"{HEADLINE_BEGIN}\n{new}{HEADLINE_END}"))


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_readme.py --write   (regenerates README.md's headline table)")
    write_headline()
