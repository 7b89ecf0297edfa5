"""A run killed with SIGKILL and continued with ``resume=DIR`` ends as the uninterrupted run of the same seed.

Each case runs ``run.py`` in a process of its own (``tests/processes.py``) on a tiny config, kills it (SIGKILL) as soon as a
given checkpoint file appears (so the kill lands inside the phase that writes it), resumes
it, and compares with an uninterrupted run: the same pruning decisions (masks, gates, the
chosen configuration) and the same test metrics (1e-6). The phases' RNG state, data order
and position, and pruner state are all restored, so these runs are deterministic on CPU.

Equal results alone cannot tell resuming from restarting (a phase started afresh is re-seeded and
ends as the uninterrupted run does), so the test also checks that each run *resumed*
(:func:`check_resumed`): results.json's ``resumed`` names every continued phase with the global
step of the killed run's ``last.ckpt`` (above 0), as the restored trainer reports it; the resumed
process logs only the remaining training batches (counted in its CSV logs); and SwiftPruner's
resumed search logs only the generations after the one its saved state completed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from processes import ScriptProcess

ROOT = Path(__file__).resolve().parents[1]
TINY_BERT = ("model.module.bert_config={vocab_size:30522,hidden_size:32,num_hidden_layers:3,num_attention_heads:4,"
             "intermediate_size:64,max_position_embeddings:128,hidden_dropout_prob:0.1,attention_probs_dropout_prob:0.1}")
COMMON = ["threads=1", "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "trainer.log_every_n_steps=1",  # every training batch in the CSV logs (counted by check_resumed)
          "latency.batch_sizes=[1]", "latency.repeats=1", "latency.warmup=0"]
# a tiny random BERT on 48 examples trains no real teacher: these runs check resuming (issue 35)
TEXT = ["model=bert", TINY_BERT, "allow_majority_class_teacher=true", "data.limit_per_split=48", "data.batch_size=8",
        "trainer.max_epochs=2", "trainer.val_check_interval=0.5", "trainer.num_sanity_val_steps=0", "latency.examples=2"]
STREAM = ["model=dlrm", "data.limit_rows=6000", "data.window=1000", "model.module.bottom_mlp=[16,8]",
          "model.module.top_mlp=[32,16]", "model.module.embedding_dim=8"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONHASHSEED": "0"}


def launch(args: list[str]) -> ScriptProcess:
    """Start ``python run.py *args`` in the repository root (its own process, output and errors together)."""
    return ScriptProcess("run.py", args, ENV, merge_stderr=True)


def finish(proc: ScriptProcess, timeout: float = 240) -> str:
    """Wait for ``proc``; return its output, failing the test on a non-zero exit."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def kill_when(proc: ScriptProcess, path: Path, timeout: float = 240) -> str | None:
    """SIGKILL ``proc`` as soon as ``path`` exists; its output, or None if the run ended first."""
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            proc.kill()  # SIGKILL
            out, _ = proc.communicate()
            return out
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{path} never appeared")


def csv_versions(run_dir: Path) -> set[Path]:
    """Every CSV logger run of the run dir (``csv/<phase>/version_<n>``; each process logs into new ones)."""
    return set((run_dir / "csv").glob("*/version_*"))


def train_rows(versions: set[Path] | list[Path], phase: str) -> int:
    """Training batches logged (rows with ``train/loss``) in the given CSV runs of ``phase``."""
    import csv

    n = 0
    for v in versions:
        if v.parent.name == phase and (v / "metrics.csv").is_file():
            with open(v / "metrics.csv") as f:
                n += sum(1 for row in csv.DictReader(f) if row.get("train/loss"))
    return n


def kill_state(run_dir: Path, point: str) -> dict:
    """What a killed run left of the phase it was killed in: ``phase``, ``done`` (its completion record),
    the global step and batches done of its ``last.ckpt`` (None: none), and, at a SwiftPruner search
    checkpoint, the generations its saved search state completed."""
    phase_dir = run_dir / Path(point).parent
    state = {"point": point, "phase": phase_dir.name, "done": (phase_dir / "complete.json").is_file(),
             "last_step": None, "batches_done": None, "generation": None}
    last = phase_dir / "last.ckpt"
    if last.is_file():
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        state["last_step"] = int(ckpt["global_step"])
        # batches whose training step ran (a stream's checkpoint is written in on_train_batch_end, before
        # Lightning counts the batch "completed"; the resumed fit does not train it again)
        state["batches_done"] = int(ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"])
    if point.endswith("search_state.pt"):
        saved = torch.load(run_dir / point, map_location="cpu", weights_only=True)
        state["generation"] = int(saved["evolution"]["completed_generations"])
    return state


def run_killed_twice(tmp_path: Path, args: list[str], kill_at: list[str]) -> tuple[dict, Path, list[dict]]:
    """Run, SIGKILL at the first appearance of ``<run dir>/<kill_at[0]>``, resume, SIGKILL that resumed run at
    ``kill_at[1]``, resume again to the end; return (results, run dir, one :func:`kill_state` per kill with the
    ``output`` and the new CSV logger runs (``versions``) of the process that resumed after it)."""
    run_dir = tmp_path / "killed"
    proc = launch([*args, f"hydra.run.dir={run_dir}"])
    kills: list[dict] = []
    before: set[Path] = set()
    for point in kill_at:
        out = kill_when(proc, run_dir / point)
        assert out is not None, f"the run ended before {point} appeared"
        if kills:  # what the previous resumed process did before this kill
            kills[-1].update(output=out, versions=csv_versions(run_dir) - before)
        assert not (run_dir / "results.json").exists()
        if point.endswith("last.ckpt"):  # a phase in progress keeps one resumable checkpoint; the best is weights only
            ckpts = [torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                     for p in (run_dir / point).parent.glob("*.ckpt")]
            assert sum("optimizer_states" in c for c in ckpts) == 1, [sorted(c) for c in ckpts]
        kills.append(kill_state(run_dir, point))
        before = csv_versions(run_dir)
        proc = launch([f"resume={run_dir}", "trainer.enable_progress_bar=false"])
    out = finish(proc)
    kills[-1].update(output=out, versions=csv_versions(run_dir) - before)
    return json.loads((run_dir / "results.json").read_text()), run_dir, kills


def check_resumed(resumed: dict, whole_dir: Path, kills: list[dict]) -> list[str]:
    """What shows that each resumed process continued the killed one instead of starting over (empty: all of it).

    * results.json's ``resumed`` lists, in order, every phase a kill left open, with the global step of
      the killed run's ``last.ckpt`` as the restored trainer reports it (above 0), or 0 for a phase killed
      before its first checkpoint (SwiftPruner mid-search); a phase killed after its completion record is
      restored, not resumed;
    * the process that resumed a phase from ``last.ckpt`` logged (CSV, every batch) only the training
      batches the uninterrupted run logged after the ones that checkpoint had done;
    * a search killed after a generation's checkpoint continues from it: the resumed process says so and
      logs only the generations after those its saved state completed.
    """
    import re

    problems, expected = [], []
    for k in kills:
        if k["done"]:
            continue
        expected.append({"phase": k["phase"], "global_step": k["last_step"] if k["last_step"] is not None else 0})
        if k["last_step"] is not None and k["last_step"] <= 0:
            problems.append(f"{k['point']}: the killed run's last.ckpt is at global step {k['last_step']}")
    if resumed["resumed"] != expected:
        problems.append(f"results.json resumed {resumed['resumed']}, expected {expected} (the killed runs' last.ckpt steps)")
    for k in kills:
        if k["done"] or k["last_step"] is None:
            continue
        total = train_rows(csv_versions(whole_dir), k["phase"])
        trained = train_rows(k["versions"], k["phase"])
        if trained != total - k["batches_done"]:
            problems.append(f"{k['point']}: the resumed process trained {trained} {k['phase']} batches; the uninterrupted "
                            f"run trained {total}, {k['batches_done']} of them before that checkpoint")
    for k in kills:
        if k["generation"] is None:
            continue
        logged = [(int(g), int(n)) for g, n in re.findall(r"generation (\d+)/(\d+): ", k["output"])]
        last = logged[-1][1] if logged else None
        if not re.search(rf"continuing the search from \S+ \(generation {k['generation']}\)", k["output"]):
            problems.append(f"{k['point']}: the resumed process did not continue the search saved at generation "
                            f"{k['generation']}")
        # generations are numbered from 0 (the initial population): after k completed, the next is number k
        if not logged or [g for g, _ in logged] != list(range(k["generation"], last + 1)):
            problems.append(f"{k['point']}: the saved search had completed {k['generation']} generations; the resumed "
                            f"process logged generations {[g for g, _ in logged]}")
    return problems


def run_whole(tmp_path: Path, args: list[str]) -> tuple[dict, Path]:
    """An uninterrupted run; (results, run dir)."""
    run_dir = tmp_path / "whole"
    finish(launch([*args, f"hydra.run.dir={run_dir}"]))
    return json.loads((run_dir / "results.json").read_text()), run_dir


def final_state(run_dir: Path, phase: str) -> dict[str, torch.Tensor]:
    """The kept weights, masks and gates of a finished phase (loaded with weights_only=True)."""
    return torch.load(run_dir / "checkpoints" / phase / "final.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def assert_same_run(a: dict, b: dict, dir_a: Path, dir_b: Path, models: list[str]) -> None:
    """Same test metrics (1e-6) and the same decisions (every mask / gate tensor equal) for ``models``."""
    for name in models:
        for key, value in a[name]["metrics"].items():
            assert b[name]["metrics"][key] == pytest.approx(value, abs=1e-6), (name, key)
        sa, sb = final_state(dir_a, name), final_state(dir_b, name)
        assert sa.keys() == sb.keys()
        for key in sa:
            if "mask" in key or "gates" in key or "log_alpha" in key:
                assert torch.equal(sa[key], sb[key]), (name, key)
            else:
                assert torch.allclose(sa[key], sb[key], atol=1e-5), (name, key)


CASES = {
    "none": (TEXT + ["pruner=none"], ["dense"], ["checkpoints/dense/last.ckpt", "checkpoints/dense/final.ckpt"]),
    # validating once per epoch: the first last.ckpt is written at epoch 0's end, so the resumed run starts by
    # ending that epoch (where early stopping must not look for a validation metric that is not there yet)
    "none_epoch_end": ([a for a in TEXT if not a.startswith("trainer.val_check_interval")]
                       + ["trainer.val_check_interval=1.0", "pruner=none"], ["dense"],
                       ["checkpoints/dense/last.ckpt", "checkpoints/dense/final.ckpt"]),
    "d2s": (STREAM + ["pruner=d2s", "pruner.update_every=5"], ["dense", "pruned"],
            ["checkpoints/dense/last.ckpt", "checkpoints/pruned/last.ckpt"]),
    "top": (TEXT + ["pruner=top", "pruner.teacher_epochs=1", "pruner.pruning_epochs=2", "pruner.bin_count=4"],
            ["dense", "pruned"], ["checkpoints/dense/last.ckpt", "checkpoints/pruned/last.ckpt"]),
    # a fixed latency table and a budget every candidate meets: the search is deterministic (timings only break
    # ties of equal proxy quality); the second kill lands mid-search (after a generation's search checkpoint)
    "swiftpruner": (TEXT[:-1] + ["trainer.max_epochs=1", "pruner=swiftpruner", "pruner.head_choices=[0,2,4]",
                                 "pruner.ffn_fractions=[0,0.5,1]", "pruner.search.generations=4",
                                 "pruner.search.population_size=4", "pruner.search.parents=2", "pruner.proxy.examples=16",
                                 "pruner.proxy.metric=auroc", "pruner.importance.examples=16",
                                 "pruner.latency.repeats=2", "pruner.latency.seq_len=16", "pruner.latency.budget_ms=1000",
                                 "pruner.latency.verify_rounds=0", "pruner.latency.calibration_models=2"],
                    ["dense", "pruned", "uniform"], ["checkpoints/dense/last.ckpt", "checkpoints/pruned/search_state.pt"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("pruner", list(CASES))
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path, pruner):
    """Same decisions and metrics as the uninterrupted run, and evidence of resuming (:func:`check_resumed`).

    Checked broken once: with resume disabled (``trainer.fit(..., ckpt_path=None)`` in
    ``pipelines.resume.fit_or_restore``) the ``none``, ``none_epoch_end``, ``d2s`` and ``top`` cases fail on
    the recorded global steps and on the batches trained (every batch of the phase again);
    with SwiftPruner's saved search state ignored (``state = None`` in ``SwiftPruner.run_search``) the
    ``swiftpruner`` case fails on both search checks (it logged generations 0-4 again).
    """
    args, models, kill_points = CASES[pruner]
    args = [*COMMON, *args]
    whole, whole_dir = run_whole(tmp_path, args)
    assert whole["resumed"] == []
    if pruner == "swiftpruner":  # the killed run predicts latency with the table the uninterrupted run measured
        args = [*args, f"pruner.latency.table={whole_dir / 'latency_table.json'}"]
    resumed, run_dir, kills = run_killed_twice(tmp_path, args, kill_points)
    problems = check_resumed(resumed, whole_dir, kills)
    assert not problems, "\n".join(problems)
    if pruner == "swiftpruner":
        # The search is identical; among candidates of equal proxy quality the pick goes to the faster *measured*
        # one, a timing: the pruned model is compared only when the pick is the same.
        for name, entry in (("pruned", "chosen"), ("uniform", "uniform")):
            a, b = whole["pruner"][entry], resumed["pruner"][entry]
            assert b["quality"] == a["quality"]
            if a["genes"] != b["genes"]:
                models = [m for m in models if m != name]
    assert_same_run(whole, resumed, whole_dir, run_dir, models)
    # every kill inside a phase's training is resumed from a checkpoint; a kill as final.ckpt appears may land
    # before or after the completion record (then the phase is finished and nothing is resumed)
    required = [p.split("/")[1] for p in kill_points if not p.endswith("final.ckpt")]
    phases = [e["phase"] for e in resumed["resumed"]]
    assert phases[: len(required)] == required and set(phases) <= {p.split("/")[1] for p in kill_points}
    if "pruner" in whole:
        for key in ("overall", "masked", "gates_frozen_at_step"):
            assert resumed["pruner"].get(key) == whole["pruner"].get(key), key
        if pruner == "swiftpruner":  # the same candidates, in the same order, with the same proxy quality
            history = [json.loads((d / "search_history.json").read_text())["candidates"] for d in (whole_dir, run_dir)]
            assert [(c["genes"], c["quality"]) for c in history[0]] == [(c["genes"], c["quality"]) for c in history[1]]
    for phase_dir in (run_dir / "checkpoints").iterdir():
        if phase_dir.is_dir():  # a finished phase keeps one checkpoint
            assert sorted(p.name for p in phase_dir.glob("*.ckpt")) == ["final.ckpt"]
    if pruner == "d2s":  # resuming a finished run changes nothing; an override changing the result is refused
        before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
        assert "is finished" in finish(launch([f"resume={run_dir}"]))
        assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
        proc = launch([f"resume={run_dir}", "pruner.target_sparsity=0.5"])
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2 and out.startswith("error:") and "pruner.target_sparsity" in out


# ------------------------------------------------------------------ fast checks of the pieces
def test_resume_argv_uses_the_saved_config_and_refuses_result_changing_overrides(tmp_path):
    from modules.core.errors import ConfigError
    from pipelines.resume import resume_argv

    assert resume_argv(["run.py", "seed=1"]) == (["run.py", "seed=1"], None)
    with pytest.raises(ConfigError, match="no saved config"):
        resume_argv(["run.py", f"resume={tmp_path}"])
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 1\n")
    argv, run_dir = resume_argv(["run.py", f"resume={tmp_path}", "trainer.enable_progress_bar=false", "logger.csv.name=x"])
    assert run_dir == tmp_path.resolve()
    assert argv[1:5] == ["--config-path", str(tmp_path.resolve() / ".hydra"), "--config-name", "config"]
    assert f"hydra.run.dir={tmp_path.resolve()}" in argv and "trainer.enable_progress_bar=false" in argv
    for bad in ("pruner.target_sparsity=0.5", "seed=3", "trainer.max_epochs=9", "+model.extra=1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].lstrip("+")):
            resume_argv(["run.py", f"resume={tmp_path}", bad])


def test_nan_guard_names_phase_and_step():
    from types import SimpleNamespace

    from pipelines.resume import NonFiniteLossError, NonFiniteLossGuard

    guard = NonFiniteLossGuard("pruned")
    trainer = SimpleNamespace(global_step=17, _results=None)
    guard.on_before_backward(trainer, None, torch.tensor(0.5))  # finite: nothing happens
    with pytest.raises(NonFiniteLossError, match=r"phase pruned: the training loss is nan at global step 17"):
        guard.on_before_backward(trainer, None, torch.tensor(float("nan")))


def test_disk_checks_fail_before_training(tmp_path, monkeypatch):
    import shutil

    from pipelines import resume

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(resume.DiskError, match="not writable"):
        resume.check_disk(blocker / "run", torch.nn.Linear(4, 4))
    resume.check_disk(tmp_path / "run", torch.nn.Linear(4, 4))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleUsage(free=10))
    with pytest.raises(resume.DiskError, match="MB free"):
        resume.check_disk(tmp_path / "run", torch.nn.Linear(400, 400))


class SimpleUsage:
    """A stand-in for ``shutil.disk_usage``'s result."""

    def __init__(self, free: int):
        self.free = free


def test_checkpoint_io_is_atomic_and_rng_state_round_trips(tmp_path):
    from pipelines.resume import AtomicCheckpointIO, RunState

    state = RunState().state_dict()
    AtomicCheckpointIO().save_checkpoint({"callbacks": {"RunState": state}}, tmp_path / "a" / "last.ckpt")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["last.ckpt"]
    loaded = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["callbacks"]["RunState"]
    expected = torch.rand(3)
    RunState().load_state_dict(loaded)
    assert torch.equal(torch.rand(3), expected)
