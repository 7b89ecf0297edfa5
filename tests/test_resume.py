"""A run killed with SIGKILL and continued with ``resume=DIR`` ends as the uninterrupted run of the same seed.

Each case runs ``run.py`` in a subprocess on a tiny config, kills it (SIGKILL) as soon as a
given checkpoint file appears (so the kill lands inside the phase that writes it), resumes
it, and compares with an uninterrupted run: the same pruning decisions (masks, gates, the
chosen configuration) and the same test metrics (1e-6). The phases' RNG state, data order
and position, and pruner state are all restored, so these runs are deterministic on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_BERT = ("model.module.bert_config={vocab_size:30522,hidden_size:32,num_hidden_layers:3,num_attention_heads:4,"
             "intermediate_size:64,max_position_embeddings:128,hidden_dropout_prob:0.1,attention_probs_dropout_prob:0.1}")
COMMON = ["threads=1", "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "latency.batch_sizes=[1]", "latency.repeats=1", "latency.warmup=0"]
TEXT = ["model=bert", TINY_BERT, "data.limit_per_split=48", "data.batch_size=8", "trainer.max_epochs=2",
        "trainer.val_check_interval=0.5", "trainer.num_sanity_val_steps=0", "latency.examples=2"]
STREAM = ["model=dlrm", "data.limit_rows=6000", "data.window=1000", "model.module.bottom_mlp=[16,8]",
          "model.module.top_mlp=[32,16]", "model.module.embedding_dim=8"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONHASHSEED": "0"}


def launch(args: list[str]) -> subprocess.Popen:
    """Start ``python run.py *args`` in the repository root."""
    return subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    """Wait for ``proc``; return its output, failing the test on a non-zero exit."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def kill_when(proc: subprocess.Popen, path: Path, timeout: float = 240) -> bool:
    """SIGKILL ``proc`` as soon as ``path`` exists; False if the run ended first."""
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{path} never appeared")


def run_killed_twice(tmp_path: Path, args: list[str], kill_at: list[str]) -> tuple[dict, Path]:
    """Run, SIGKILL at the first appearance of ``<run dir>/<kill_at[0]>``, resume, SIGKILL that resumed run at
    ``kill_at[1]``, resume again to the end; return (results, run dir)."""
    run_dir = tmp_path / "killed"
    proc = launch([*args, f"hydra.run.dir={run_dir}"])
    for point in kill_at:
        assert kill_when(proc, run_dir / point), f"the run ended before {point} appeared"
        assert not (run_dir / "results.json").exists()
        proc = launch([f"resume={run_dir}", "trainer.enable_progress_bar=false"])
    finish(proc)
    return json.loads((run_dir / "results.json").read_text()), run_dir


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
    "d2s": (STREAM + ["pruner=d2s", "pruner.update_every=5"], ["dense", "pruned"],
            ["checkpoints/dense/last.ckpt", "checkpoints/pruned/last.ckpt"]),
    "top": (TEXT + ["pruner=top", "pruner.teacher_epochs=1", "pruner.pruning_epochs=2", "pruner.bin_count=4"],
            ["dense", "pruned"], ["checkpoints/dense/last.ckpt", "checkpoints/pruned/last.ckpt"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("pruner", list(CASES))
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path, pruner):
    args, models, kill_points = CASES[pruner]
    args = [*COMMON, *args]
    whole, whole_dir = run_whole(tmp_path, args)
    assert whole["resumed"] == []
    resumed, run_dir = run_killed_twice(tmp_path, args, kill_points)
    assert_same_run(whole, resumed, whole_dir, run_dir, models)
    assert [e["phase"] for e in resumed["resumed"]] == [p.split("/")[1] for p in kill_points if p.endswith("last.ckpt")]
    if "pruner" in whole:
        for key in ("overall", "masked", "gates_frozen_at_step", "chosen"):
            assert resumed["pruner"].get(key) == whole["pruner"].get(key), key
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
