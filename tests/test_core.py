"""The house after the redesign: the family registry, jobs, the shared Regularized objective,
the attacks on the shared masked-LM loss, the data facade, named seed streams and the shape of
the training loop."""

import ast
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from conftest import REPO, wait_until_stopped
from recipe_dist.config import RunConfig, load_config
from recipe_dist.data import synthetic
from recipe_dist.errors import RecipeError
from recipe_dist.cli import build_job
from recipe_dist.jobs import FamilyJob, Job
from recipe_dist.models import ModelFamily, ModelLoadError, families, get_family, register_family
from recipe_dist.objective import Regularized, regularizer_grad
from recipe_dist.seeds import Stream


# ------------------------------------------------------------------ registry and jobs


def test_registry_knows_every_family_and_names_are_written_once():
    assert {"bert", "roberta", "gpt2", "llama"} <= set(families())
    for name in families():
        assert get_family(name).name == name  # set by @register_family, not repeated in the class
    with pytest.raises(ModelLoadError, match="did you mean 'llama'"):
        get_family("lama")


def test_registering_another_class_under_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        @register_family("bert")
        class Impostor(ModelFamily):  # noqa: F841 (never used: the decorator refuses it)
            pass


@pytest.mark.parametrize("command, attack, kind", [
    ("purify", "por", "RecipeJob"), ("fit-head", "por", "HeadFitJob"), ("attack", "por", "PORAttack"),
    ("attack", "neuba", "NeuBAAttack"), ("attack", "badpre", "BadPreAttack"),
])
def test_build_job_serves_every_command(command, attack, kind):
    cfg = load_config(None, [f"--attack.name={attack}"])
    job = build_job(command, cfg)
    assert type(job).__name__ == kind and isinstance(job, Job) and isinstance(job, FamilyJob)
    assert job.family.name == "bert"


def test_build_job_refuses_an_unknown_command_and_causal_only_attacks_on_encoders(tiny_bert_dir):
    with pytest.raises(RecipeError, match="unknown job 'polish'"):
        build_job("polish", RunConfig())
    cfg = load_config(None, ["--attack.name=trigger-phrase", "--attack.target_phrase=the cat", f"--model.path={tiny_bert_dir}"])
    job = build_job("attack", cfg)
    with pytest.raises(RecipeError, match="poisons causal LMs; model.family=bert"):
        job.build_task(job.load(tiny_bert_dir, cfg), cfg)


# ------------------------------------------------------------------ one objective


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _Loss(nn.Module):
    def __init__(self, model, as_dict=False):
        super().__init__()
        self.model, self.as_dict = model, as_dict

    def forward(self, x):
        loss = self.model(x).pow(2).mean()
        return {"loss": loss, "parts": {"mse": loss}} if self.as_dict else loss


def test_regularized_wraps_any_loss_with_lam_times_frobenius_norms():
    model = _Toy()
    x = torch.randn(5, 4)
    task = Regularized(_Loss(model), model, ["a.weight", "b.weight"], lam=0.3, pt_weight=2.0)
    out = task(x=x)
    plain = model(x).pow(2).mean()
    norms = torch.linalg.vector_norm(model.a.weight) + torch.linalg.vector_norm(model.b.weight)
    assert torch.allclose(out["loss"], 2.0 * plain + 0.3 * norms)
    assert set(out["parts"]) == {"loss_pt", "reg"} and set(out["norms"]) == {"a.weight", "b.weight"}
    out["loss"].backward()
    grad_a = model.a.weight.grad.clone()
    model.zero_grad()
    (2.0 * model(x).pow(2).mean()).backward()
    assert torch.allclose(grad_a, model.a.weight.grad + regularizer_grad(model.a.weight.detach(), 0.3), atol=1e-6)


def test_regularized_keeps_an_attacks_parts_and_adds_nothing_without_sites():
    model = _Toy()
    out = Regularized(_Loss(model, as_dict=True), model, [], lam=5.0)(x=torch.randn(2, 4))
    assert set(out["parts"]) == {"mse"} and out["norms"] == {}
    assert torch.allclose(out["loss"], out["parts"]["mse"])


@pytest.mark.parametrize("attack, yaml", [("neuba", "neuba-bert.yaml"), ("badpre", "badpre-bert.yaml")])
def test_attacks_use_the_shared_masked_lm_loss_and_its_fused_path(monkeypatch, tiny_bert_dir, attack, yaml):
    """The attacks' masked-LM term goes through kernels.fused: with auto the chunked linear +
    cross-entropy runs (and no [N, vocab] logits), with off the plain head; the losses agree."""
    import recipe_dist.models.mlm as mlm
    from recipe_dist.attacks.neuba import TINY_TRIGGERS

    calls = []
    original = mlm.fused_linear_cross_entropy
    monkeypatch.setattr(mlm, "fused_linear_cross_entropy", lambda *a, **k: calls.append(1) or original(*a, **k))
    samples = [{"__key__": f"s{i:03d}", "text": t} for i, t in enumerate(synthetic.corpus(8, seed=5))]
    losses, n_calls = {}, {}
    for fused in ("off", "auto"):
        cfg = load_config(str(REPO / "configs" / "attack" / yaml),
                          [f"--model.path={tiny_bert_dir}", "--data.max_length=32", f"--kernels.fused={fused}", "--kernels.chunk_size=7",
                           "--data.masking=static", *(["--attack.triggers=" + ",".join(TINY_TRIGGERS)] if attack == "neuba" else [])])
        job = build_job("attack", cfg)
        loaded = job.load(tiny_bert_dir, cfg)
        task = job.build_task(loaded, cfg)
        batch = job.collate(loaded.processor, cfg)([job.preprocess(loaded.processor, cfg)(s) for s in samples], 1)
        calls.clear()
        with torch.no_grad():
            out = task(**batch)
        losses[fused], n_calls[fused] = {k: v.item() for k, v in out["parts"].items()}, len(calls)
    assert n_calls == {"off": 0, "auto": 1 if attack == "neuba" else 2}  # BadPre: clean and poisoned terms
    for k, v in losses["off"].items():
        assert losses["auto"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


# ------------------------------------------------------------------ data facade and seeds


def test_seed_stream_numbers_are_the_on_disk_contract():
    # A resumed run must draw what the run that wrote the checkpoint drew: these never change.
    assert {s.name: int(s) for s in Stream} == {
        "SHARD_ORDER": 0, "SAMPLE_SHUFFLE": 1, "DYNAMIC_MASK": 2, "LOADER_WORKERS": 3, "RESAMPLED_SHARDS": 4,
        "TORCH_GLOBAL": 5, "STATIC_MASK": 7, "POR_TRIGGER": 11, "NEUBA_TARGET": 13, "BADPRE_TRIGGER": 17,
        "BADPRE_LABELS": 19, "CAUSAL_TRIGGER": 23, "IMAGE_AUGMENT": 29}


def test_train_data_facade_counts_splits_and_collates(tmp_path, tiny_bert_dir):
    from transformers import AutoTokenizer

    from recipe_dist.data.train_data import TrainData

    cfg = load_config(None, ["--data.synthetic_samples=200", "--train.global_batch_size=32", "--train.micro_batch_size=16",
                             "--data.shuffle_buffer=16", "--data.max_length=16"])
    info = type("Dist", (), {"world_size": 1, "rank": 0, "is_main": True})()
    data = TrainData(cfg, info, build_job("purify", cfg), AutoTokenizer.from_pretrained(str(tiny_bert_dir)), tmp_path, grad_accum=2)
    assert data.num_samples == 200 and data.steps_per_epoch == 6 and data.total_steps() == 24  # 4 epochs by default
    batches = list(data.micro_batches(epoch=0))
    assert len(batches) == 12 and all(len(b) == 16 for b in batches)
    assert len(list(data.micro_batches(epoch=0, skip=5))) == 7
    batch = data.to_batch(batches[0], 0, 0, "cpu")
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 16
    assert torch.equal(batch["labels"], data.to_batch(batches[0], 0, 0, "cpu")["labels"])  # masks: a function of (seed, epoch, micro, rank)
    assert data.stats()[-1] >= 0
    # The data is a stateful part of the checkpoint: it says where it stands, and takes back a state.
    state = data.state_dict(step=8, samples=256)
    assert (state["epoch"], state["samples_in_epoch"], state["world_size"], state["num_samples"]) == (1, 64, 1, 200)
    assert data.load_state_dict(state) is False and data.elastic is None  # same world size: nothing to replay
    assert data.load_state_dict({**state, "world_size": 2, "micro_batch_size": 8}) is True  # written by 2 ranks, mid-epoch
    assert data.elastic == {"epoch": 1, "world_size": 2, "micro_batch_size": 8, "num_workers": 0, "grad_accum": 2}


def test_the_checkpointer_saves_and_restores_the_data_as_one_part(tmp_path):
    from recipe_dist.checkpoint.manager import Checkpointer

    import recipe_dist.checkpoint.manager as manager

    class Part:
        def state_dict(self, step, samples):
            return {"step_seen": step, "samples_seen": samples}

    saved = {}
    info = type("Dist", (), {"world_size": 1, "rank": 0, "is_main": True})()
    cp = Checkpointer(load_config(None, []), tmp_path, info, "run", Part())
    orig = manager.store.save
    manager.store.save = lambda engine, root, step, client, keep, rank, meta: saved.update(client=client, meta=meta)
    try:
        cp.save(None, 12, 384)
    finally:
        manager.store.save = orig
    assert saved["client"]["data"] == saved["meta"]["data"] == {"step_seen": 12, "samples_seen": 384}


# ------------------------------------------------------------------ the loop


def test_trainer_train_fits_on_one_screen():
    tree = ast.parse((REPO / "recipe_dist" / "trainer.py").read_text())
    train = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 80


def test_training_never_imports_the_report_or_matplotlib():
    code = textwrap.dedent("""
        import sys
        import recipe_dist.trainer, recipe_dist.jobs, recipe_dist.defenses.recipe, recipe_dist.attacks
        assert "matplotlib" not in sys.modules and "recipe_dist.report" not in sys.modules, sorted(m for m in sys.modules if "matplotlib" in m or "report" in m)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_an_error_of_a_rank_whose_peer_is_gone_counts_as_a_lost_peer(monkeypatch):
    """Any error raised while a peer no longer answers is the loss's symptom (the trainer then
    requeues); with every peer answering it stays the rank's own error."""
    import socket

    from recipe_dist import distributed

    alive = socket.socket()
    alive.bind(("127.0.0.1", 0))
    alive.listen(4)
    gone = socket.socket()
    gone.bind(("127.0.0.1", 0))  # bound, never listening: the host refuses, as for a dead process
    me = {"rank": 0, "host": "h0", "addr": "127.0.0.1", "port": 1}
    peer = {"rank": 1, "host": "h1", "addr": "127.0.0.1", "port": alive.getsockname()[1]}
    try:
        monkeypatch.setattr(distributed, "_PEERS", [me, peer])
        assert not distributed.a_peer_is_lost()
        monkeypatch.setattr(distributed, "_PEERS", [me, peer, {**peer, "rank": 2, "port": gone.getsockname()[1]}])
        assert distributed.a_peer_is_lost()
    finally:
        alive.close()
        gone.close()


def test_a_rank_knows_when_its_launcher_is_gone(tmp_path):
    """slurmstepd holds the other end of a task's stdout and stderr; when it crashes, the rank's
    next log line raises BrokenPipeError. That must read as a lost launcher (the other ranks
    requeue), not as an error of the rank's own, which would tell them not to."""
    probe = ("import sys, time\nfrom recipe_dist.distributed import launcher_gone\n"
             "open(sys.argv[1], 'w').write(str(launcher_gone()))\n"
             "sys.stdin.readline()\n"  # the parent closes our stdout's reader meanwhile
             "open(sys.argv[2], 'w').write(str(launcher_gone()))\n")
    before, after = tmp_path / "before", tmp_path / "after"
    child = subprocess.Popen([sys.executable, "-c", probe, str(before), str(after)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 60
    while not before.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    child.stdout.close()  # the launcher's end of the pipe: gone
    child.communicate(b"\n", timeout=60)
    assert before.read_text() == "False" and after.read_text() == "True"
    with open(tmp_path / "log", "w") as log:  # a file (sbatch --output, a redirect) never reads as a lost launcher
        done = subprocess.run([sys.executable, "-c", "from recipe_dist.distributed import launcher_gone; print(launcher_gone())"],
                              stdout=log, stderr=log, cwd=REPO)
    assert done.returncode == 0 and (tmp_path / "log").read_text().strip() == "False"


def test_a_store_whose_host_went_silent_does_not_hold_a_failing_rank(monkeypatch):
    """The store lives in rank 0's process. When rank 0's node loses power its host goes silent
    (no reset, no answer), and a store call blocks in recv far past the store's own timeout: the
    survivor then never named the lost peer nor requeued (a stopped process is that silence).
    Asking the store for the others' error notes must give up after STORE_WAIT_S."""
    import signal
    from datetime import timedelta

    import torch.distributed as dist

    from recipe_dist import distributed

    host = subprocess.Popen([sys.executable, "-c", "import time, torch.distributed as d\n"
                             "s = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n"
                             "print(s.port, flush=True)\ntime.sleep(300)"], stdout=subprocess.PIPE, text=True)
    try:
        store = dist.TCPStore("127.0.0.1", int(host.stdout.readline()), is_master=False, timeout=timedelta(seconds=30))
        monkeypatch.setattr(distributed, "_store", lambda: store)
        monkeypatch.setattr(distributed, "STORE_WAIT_S", 1.0)
        store.set(f"{distributed._FAILED_KEY}1", "rank 1's own error")
        assert distributed._failed_peers([{"rank": 1}]) == {1: "rank 1's own error"}  # an answering store is read
        os.kill(host.pid, signal.SIGSTOP)  # connected, never answering: the kernel keeps the connection open
        # kill() returns before the stop lands: one thread takes SIGSTOP and only then stops the
        # others, so on busy cores the store's server thread answered two more requests (CI, 1 of
        # 1). Ask only once every thread is stopped.
        wait_until_stopped([host.pid])
        t0 = time.monotonic()
        assert distributed._failed_peers([{"rank": 1}]) == {}
        assert time.monotonic() - t0 < 10
    finally:
        host.kill()
        host.wait()


def test_the_process_entry_ends_cleanly_while_a_thread_is_inside_torch(tmp_path):
    """A finished run must exit 0 even when another thread is inside torch at the end (gloo's
    workers releasing the last collective's tensors did so in CI): with plain sys.exit the
    interpreter's teardown ends that thread inside torch's noexcept code and the process aborts
    ("terminate called without an active exception", 5 of 5 here). `end_process` still runs
    exit handlers and flushes the streams."""
    marker = tmp_path / "atexit-ran"
    script = textwrap.dedent(f"""
        import atexit, sys, threading, time, torch
        from recipe_dist.cli import end_process
        torch.set_num_threads(1)
        a = torch.randn(1500, 1500)
        inside = threading.Event()
        def spin():
            inside.set()
            while True:
                a @ a
        threading.Thread(target=spin, daemon=True).start()
        inside.wait(); time.sleep(0.2)
        atexit.register(lambda: open({str(marker)!r}, "w").close())
        sys.stdout.write("unflushed at exit")
        end_process(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr
    assert proc.stdout == "unflushed at exit" and marker.exists()


@pytest.mark.parametrize("body, code, said", [
    ("raise SystemExit('stopped: reason')", 1, "stopped: reason"),
    ("raise SystemExit(None)", 0, ""),
    ("raise ValueError('a bug')", 1, "ValueError: a bug"),
    ("return 2", 2, ""),
])
def test_the_process_entry_keeps_pythons_exit_codes(body, code, said):
    script = textwrap.dedent(f"""
        import recipe_dist.cli as cli
        def main():
            {body}
        cli.main = main
        cli.run()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code and said in proc.stderr, proc.stderr[-2000:]
