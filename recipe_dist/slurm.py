"""`recipe-dist slurm submit|status|run-task`: render the sbatch templates, submit, watch.

    recipe-dist slurm submit --config C [--nodes N --ntasks-per-node K --gpus-per-node G --time T ...] [overrides]
    recipe-dist slurm submit --manifest models.jsonl --config C --output_dir BATCH [...]
    recipe-dist slurm submit ... --dry-run
    recipe-dist slurm status --output_dir DIR

A manifest line is {"model": PATH, "output_dir": DIR, ...overrides as "section.key": value}; it
becomes one task of a SLURM array. Every config (and every manifest line) is loaded and validated
before anything is submitted. Submissions are recorded in OUTPUT_DIR/slurm/jobs.jsonl, which
`status` reads together with each run directory and squeue.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .config import ConfigError, fit_batch_to_world, load_config
from .errors import RecipeError

REPO = Path(__file__).resolve().parents[1]
MARKER = "# @RECIPE_DIST_DIRECTIVES@"


class SlurmError(RecipeError):
    pass


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="recipe-dist slurm submit", description="Render slurm/*.sbatch and submit it with sbatch.")
    ap.add_argument("--config", required=True, help="YAML run config")
    ap.add_argument("--command", default="purify", choices=["purify", "attack", "fit-head"], help="recipe-dist command each task runs")
    ap.add_argument("--manifest", default=None, help="JSONL, one model per line: an array job (see the module help)")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--ntasks-per-node", type=int, default=1, help="processes per node: one per GPU (or per CPU process)")
    ap.add_argument("--gpus-per-node", type=int, default=0)
    ap.add_argument("--cpus-per-task", type=int, default=0)
    ap.add_argument("--time", default="", help="time limit, e.g. 12:00:00")
    ap.add_argument("--partition", default="")
    ap.add_argument("--account", default="")
    ap.add_argument("--qos", default="")
    ap.add_argument("--constraint", default="")
    ap.add_argument("--job-name", default="recipe-dist")
    ap.add_argument("--signal", default="USR1", help="signal SLURM sends before the time limit (handled by preempt.signals)")
    ap.add_argument("--signal-lead", type=int, default=120, help="seconds before the time limit the signal comes")
    ap.add_argument("--sbatch", action="append", default=[], metavar="OPTION", help="an extra sbatch option, e.g. --sbatch=--mem=32G (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="print the rendered script and the sbatch line; submit nothing")
    return ap


# SLURM's --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds, or no limit.
TIME_LIMIT = re.compile(r"(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2}|UNLIMITED|INFINITE)", re.I)


def check_directives(a, cfg) -> None:
    """Refuse, before anything is submitted, a directive SLURM would reject or that would fail the
    job only once it runs: counts below one, a malformed time limit, a signal the run does not
    handle (it would kill the job without a save), or a world the config's batch does not divide."""
    for opt, value, low in (("--nodes", a.nodes, 1), ("--ntasks-per-node", a.ntasks_per_node, 1),
                            ("--gpus-per-node", a.gpus_per_node, 0), ("--cpus-per-task", a.cpus_per_task, 0)):
        if value < low:
            raise SlurmError(f"{opt}: must be >= {low}, got {value}")
    if not 0 < a.signal_lead <= 65535:
        raise SlurmError(f"--signal-lead: seconds before the time limit, in 1..65535, got {a.signal_lead}")
    if a.time and not TIME_LIMIT.fullmatch(a.time):
        raise SlurmError(f"--time: {a.time!r} is not a SLURM time limit (e.g. 90, 12:00:00, 2-00:00:00)")
    name = a.signal.split(":")[-1].upper().removeprefix("SIG")
    if name not in [s.upper() for s in cfg.preempt.signals]:
        raise SlurmError(f"--signal: {a.signal} is not one the run handles (preempt.signals: {', '.join(cfg.preempt.signals)}); "
                         f"it would stop the job without a save; add it with --preempt.signals or pick one of those")
    try:
        # What each rank will do at start: lower the micro batch where that fits, else refuse now,
        # not after the job waited in the queue.
        fit_batch_to_world(copy.deepcopy(cfg), a.nodes * a.ntasks_per_node)
    except ConfigError as e:
        raise SlurmError(f"--nodes {a.nodes} x --ntasks-per-node {a.ntasks_per_node}: {e}") from None


def _directives(a, log: str, array: int | None) -> list[str]:
    lines = [f"--job-name={a.job_name}", f"--nodes={a.nodes}", f"--ntasks-per-node={a.ntasks_per_node}", f"--output={log}",
             f"--signal={a.signal}@{a.signal_lead}"]
    if a.gpus_per_node:
        lines.append(f"--gpus-per-node={a.gpus_per_node}")
    if a.cpus_per_task:
        lines.append(f"--cpus-per-task={a.cpus_per_task}")
    for key in ("time", "partition", "account", "qos", "constraint"):
        if getattr(a, key):
            lines.append(f"--{key}={getattr(a, key)}")
    if array is not None:
        lines.append(f"--array=0-{array - 1}")
    lines += a.sbatch
    return [f"#SBATCH {d}" for d in lines]


def _render(template: str, directives: list[str], env: dict) -> str:
    text = (REPO / "slurm" / template).read_text()
    exports = [f"export {k}={json.dumps(v)}" for k, v in env.items()]
    return text.replace(MARKER, "\n".join(directives + exports))


def read_manifest(path: Path, config: str, command: str, common: list[str]) -> list[list[str]]:
    """Each line as a full recipe-dist argument list, validated; a bad line is refused with its number."""
    if not path.is_file():
        raise SlurmError(f"--manifest: file not found: {path}")
    tasks = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlurmError(f"--manifest {path}:{no}: invalid JSON ({e.msg})") from None
        if not isinstance(entry, dict) or not entry.get("model") or not entry.get("output_dir"):
            raise SlurmError(f"--manifest {path}:{no}: each line needs \"model\" and \"output_dir\"")
        args = [command, "--config", config, *common, "--model.path", str(Path(entry["model"]).resolve()),
                "--output_dir", str(Path(entry["output_dir"]).resolve())]
        args += [f"--{k}={v if not isinstance(v, (list, dict)) else json.dumps(v)}" for k, v in entry.items() if k not in ("model", "output_dir")]
        try:
            load_config(config, args[3:]).check_training_data()
        except ConfigError as e:
            raise SlurmError(f"--manifest {path}:{no}: {e}") from None
        tasks.append(args)
    if not tasks:
        raise SlurmError(f"--manifest {path}: no models")
    return tasks


def _without_output_dir(overrides: list[str]) -> list[str]:
    """`overrides` less its --output_dir (given once, resolved, by the caller)."""
    out, skip = [], False
    for arg in overrides:
        if skip:
            skip = False
            continue
        if arg in ("--output_dir", "--output-dir"):
            skip = True
            continue
        if arg.startswith(("--output_dir=", "--output-dir=")):
            continue
        out.append(arg)
    return out


def submit(argv: list[str]) -> int:
    a, overrides = _parser().parse_known_args(argv)
    cfg = load_config(a.config, overrides)  # every key and value checked before anything is submitted
    if not a.manifest:
        cfg.check_training_data()  # a manifest's lines are checked with their own model.path (read_manifest)
    check_directives(a, cfg)
    out = Path(cfg.output_dir).resolve()
    env = {"RECIPE_DIST_PYTHON": sys.executable, "RECIPE_DIST_ROOT": str(REPO)}
    stamp = time.strftime("%Y%m%dT%H%M%S")
    slurm_dir = out / "slurm"
    if a.manifest:
        tasks = read_manifest(Path(a.manifest), str(Path(a.config).resolve()), a.command, overrides)
        task_file = slurm_dir / f"tasks-{stamp}.jsonl"
        script = _render("array.sbatch", _directives(a, str(slurm_dir / "slurm-%A_%a.out"), len(tasks)), env)
        args = [str(task_file)]
        outputs = [t[len(t) - 1 - t[::-1].index("--output_dir") + 1] for t in tasks]  # the line's own, last
    else:
        tasks = None
        script = _render("purify.sbatch", _directives(a, str(slurm_dir / "slurm-%j.out"), None), env)
        args = [a.command, "--config", str(Path(a.config).resolve()), *_without_output_dir(overrides), "--output_dir", str(out)]
        outputs = [str(out)]
    script_path = slurm_dir / f"job-{stamp}.sbatch"
    line = ["sbatch", "--parsable", str(script_path), *args]
    if a.dry_run:
        # Nothing is written: the line names the script by the file the user saves it to.
        print(script)
        print("# to submit: save the script above as job.sbatch, then run")
        print("# " + shlex.join(["mkdir", "-p", str(slurm_dir)]) + " && " + shlex.join(["sbatch", "--parsable", "job.sbatch", *args]))
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError("sbatch not found on PATH: run this on a SLURM login node (or use --dry-run to see the script)")
    slurm_dir.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    if tasks is not None:
        task_file.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    proc = subprocess.run([sbatch, *line[1:]], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError("sbatch rejected the job: " + (" ".join(proc.stderr.split()) or f"exit code {proc.returncode}"))
    job = proc.stdout.strip().split(";")[0]
    with open(slurm_dir / "jobs.jsonl", "a") as f:
        f.write(json.dumps({"job": job, "script": str(script_path), "array": tasks is not None, "outputs": outputs, "time": time.time()}) + "\n")
    print(job)
    return 0


def task_argv(argv: list[str]) -> list[str]:
    """`run-task TASK_FILE INDEX` (what array.sbatch calls on every task): the command line of
    line INDEX of TASK_FILE, resuming; the CLI runs it (slurm never imports the CLI)."""
    if len(argv) != 2:
        raise SlurmError("usage: recipe-dist slurm run-task TASK_FILE INDEX")
    lines = Path(argv[0]).read_text().splitlines()
    args = json.loads(lines[int(argv[1])])
    return [*args, "--resume", "auto"]


def _squeue() -> tuple[dict[str, str] | None, str]:
    """(job id (and array task ids) -> state code, "") or, where the queue cannot be read, (None, why)."""
    if shutil.which("squeue") is None:
        return None, "squeue not found"
    proc = subprocess.run(["squeue", "-h", "-o", "%i %t"], capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return None, f"squeue failed: {why}"
    return dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2), ""


def _last_error(log_glob: list[Path]) -> str:
    for log in sorted(log_glob, key=lambda p: p.stat().st_mtime, reverse=True):
        errors = [ln for ln in log.read_text(errors="replace").splitlines() if "recipe-dist: error:" in ln]
        if errors:
            return errors[-1].split("recipe-dist: error:", 1)[1].strip()
    return ""


def _json_or_none(path: Path) -> dict | None:
    """A run's JSON file as a dict; None when absent, unreadable or not a JSON object (the table
    then shows what it can instead of a traceback)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _job_records(path: Path) -> list[dict]:
    """The submissions in jobs.jsonl. A last line cut short (a submit killed while appending) is
    skipped with a warning; a damaged line before the end is an error naming it."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise SlurmError(f"{path}: unreadable ({e.strerror})") from None
    records = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not {"job", "outputs", "array"} <= set(rec):
                raise ValueError("not a submission record")
        except ValueError as e:
            if no == len(lines):
                print(f"[recipe-dist] warning: {path}:{no}: last line is incomplete ({e}); skipped", file=sys.stderr)
                continue
            raise SlurmError(f"{path}:{no}: not a submission record ({e}); fix or remove that line") from None
        records.append(rec)
    return records


def status(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="recipe-dist slurm status", description="One table: each submitted run's state.")
    ap.add_argument("--output_dir", "--output-dir", required=True, help="the output_dir given to submit (a batch directory for manifests)")
    a = ap.parse_args(argv)
    base = Path(a.output_dir)
    records = _job_records(base / "slurm" / "jobs.jsonl")
    if not records:
        raise SlurmError(f"--output_dir: no submissions recorded in {base / 'slurm' / 'jobs.jsonl'}")
    queue, unreadable = _squeue()
    rows = []
    for rec in records:
        for i, run in enumerate(rec["outputs"]):
            job = f"{rec['job']}_{i}" if rec["array"] else rec["job"]
            run_dir = Path(run)
            state = None if queue is None else queue.get(job) or (queue.get(rec["job"]) if not rec["array"] else None)
            logs = list((base / "slurm").glob(f"slurm-{rec['job']}_{i}.out" if rec["array"] else f"slurm-{rec['job']}.out"))
            progress = _json_or_none(run_dir / "progress.json")  # replaced atomically, but a copy may be cut short
            summary = _json_or_none(run_dir / "summary.json")
            if summary is not None:
                detail = f"{summary.get('steps')} steps"
                ev = _json_or_none(run_dir / "eval" / "eval.json")
                if ev is not None and isinstance(ev.get("aasr"), (int, float)):
                    detail += f", AASR {ev['aasr']:.2f}"
                rows.append((job, run, "done", detail))
            elif state == "PD":
                rows.append((job, run, "queued", ""))
            elif state in ("R", "CG"):
                fields = [progress.get(k) for k in ("step", "total_steps", "steps_per_second")] if progress else []
                if fields and all(isinstance(v, (int, float)) for v in fields):
                    step, total, rate = fields
                    eta = (total - step) / max(rate, 1e-9)
                    rows.append((job, run, "running", f"step {step}/{total}, ETA {eta / 60:.1f} min"))
                else:
                    rows.append((job, run, "running", "starting"))
            else:
                err = _last_error(logs)
                if queue is None and not err:
                    # A job absent from an unreadable queue may still be queued or running.
                    rows.append((job, run, "unknown", unreadable))
                else:
                    rows.append((job, run, "failed" if err or not state else state, err))
    print("| job | output_dir | state | detail |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    for rec in records:
        for run in rec["outputs"]:
            history = attempt_history(Path(run))
            if len(history) > 1 or any(h[-1] != "finished" for h in history):
                print(f"\nhistory of {run} (attempts.jsonl):\n")
                print("| attempt | job | nodes | rank 0 on | steps | how it ended |")
                print("| --- | --- | --- | --- | --- | --- |")
                for i, h in enumerate(history, 1):
                    print("| " + " | ".join([str(i), *h]) + " |")
    return 0


def attempt_history(run_dir: Path) -> list[tuple[str, str, str, str, str]]:
    """The run's attempts from its attempts.jsonl (rundir.record_attempt): (job, nodes, rank 0's
    host, steps, how it ended) each. A start with no end line is an attempt killed outright."""
    try:
        lines = (run_dir / "attempts.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return []
    attempts: list[dict] = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill: the others still tell the story
        if not isinstance(rec, dict):
            continue
        if rec.get("event") == "start":
            attempts.append({"start": rec})
        elif rec.get("event") == "end" and attempts and "end" not in attempts[-1]:
            attempts[-1]["end"] = rec
    rows = []
    for a in attempts:
        start, end = a["start"], a.get("end", {})
        job = f"{start.get('job')}" + (f" (requeue {start['restart']})" if start.get("restart") else "") if start.get("job") else "-"
        steps = f"{start.get('from_step')} -> {end['step']}" if "step" in end else f"from {start.get('from_step')}"
        how = end.get("outcome") or "no end recorded: killed outright (node failure, SIGKILL, cancelled)"
        rows.append((job, str(start.get("nodes", "?")), str(start.get("host", "?")), steps, str(how).replace("|", "/")))
    return rows


def main(argv: list[str]) -> int:
    commands = {"submit": submit, "status": status}
    if not argv or argv[0] not in commands:
        print("usage: recipe-dist slurm {submit,status} [options]  (recipe-dist slurm submit --help)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])
