"""Sweeps (issue 21): one sweep dir, a summary with failed jobs named, the Pareto front, the teacher cache, launchers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import pipelines.configs  # noqa: F401  (registers the schemas)
from conftest import compose_config
from pipelines.sweep import headline_figures, pareto_front, write_summary
from pipelines.resume import read_record
from pipelines.teacher_cache import cache_key, dense_teacher, key_material, store, valid_entry
from pipelines.threads import apply_threads, latency_threads, training_threads
from processes import run_script

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
TINY_STREAM = ["model=dlrm", "data.window=1000", "threads=1", "latency.repeats=2",
               "latency.warmup=1", "latency.batch_sizes=[1]", "logger=csv", "trainer.enable_progress_bar=false"]


def multirun(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``python run.py -m <overrides>`` with its outputs under ``tmp_path``; (the process, its one sweep dir)."""
    proc = run_script("run.py", ["-m", f"paths.log_dir={tmp_path}", *overrides], ENV, timeout=600)
    sweeps = list((tmp_path / "multiruns").iterdir())
    assert len(sweeps) == 1, (sweeps, proc.stderr[-2000:])
    return proc, sweeps[0]


def read_rows(sweep: Path) -> list[dict]:
    with (sweep / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def test_pareto_front_keeps_the_non_dominated_rows():
    rows = [{"a": 0.8, "b": 1.0}, {"a": 0.7, "b": 2.0}, {"a": 0.6, "b": 1.5}, {"a": None, "b": 9.0}, {"a": 0.8, "b": 1.0}]
    assert pareto_front(rows, ["a", "b"], ["maximize", "maximize"]) == [0, 1, 4]
    assert pareto_front(rows, ["a", "b"], ["minimize", "maximize"]) == [1, 2]


def test_summary_of_fake_jobs_names_the_failed_one_and_plots_the_front(tmp_path):
    def job(num: int, status: str, results: dict | None, overrides: str) -> None:
        d = tmp_path / str(num)
        (d / ".hydra").mkdir(parents=True)
        (d / "job_status.json").write_text(json.dumps({"status": status, "overrides": overrides,
                                                        "error": None if status == "completed" else "DataError: bad"}))
        if results is not None:
            (d / "results.json").write_text(json.dumps(results))

    def results(acc: float, macs: float) -> dict:
        return {"dense": {"metrics": {"accuracy": 0.8}}, "pruned": {"metrics": {"accuracy": acc, "sparsity": 0.5}},
                "macs_reduction": macs, "speedup": {"1": 1.1, "32": 1.9}, "wall_clock_s": 10}

    job(0, "completed", results(0.79, 1.5), "common=1 pruner.target_sparsity=0.4")
    job(1, "completed", results(0.75, 2.5), "common=1 pruner.target_sparsity=0.6")
    job(2, "completed", results(0.70, 2.0), "common=1 pruner.target_sparsity=0.5")
    job(3, "failed", None, "common=1 pruner.target_sparsity=2")
    out = write_summary(tmp_path, ["pruned.metrics.accuracy", "macs_reduction"], ["maximize", "maximize"])
    assert out["pareto"] == [0, 1]
    rows = read_rows(tmp_path)
    assert [r["status"] for r in rows] == ["completed"] * 3 + ["failed"]
    assert rows[3]["error"] == "DataError: bad" and rows[0]["speedup_bs32"] == "1.9"
    assert float(rows[1]["drop_points"]) == pytest.approx(5.0) and rows[1]["pareto"] == "True"
    md = (tmp_path / "summary.md").read_text()
    assert "3 completed, 1 failed" in md and "Pareto front" in md and "`common=1`" in md
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_headline_figures_of_a_stream_run():
    results = {"dense": {"metrics": {"auc": 0.70}, "macs_per_sample": 200}, "pruned": {"metrics": {"auc": 0.69},
               "macs_per_sample": 100}, "pruner": {"overall": 0.9}, "speedup": {"1": 1.0}, "threads": {"train": 3}}
    h = headline_figures(results)
    assert h["metric"] == "auc" and h["macs_reduction"] == 2.0 and h["sparsity"] == 0.9 and h["threads"] == 3
    assert h["drop_points"] == pytest.approx(1.0)


def test_threads_default_to_the_available_cores_and_latency_has_its_own(tmp_path):
    cfg = compose_config(output_dir=tmp_path)
    assert cfg.threads is None and cfg.latency.threads is None
    assert 1 <= training_threads(cfg) <= len(os.sched_getaffinity(0)) and latency_threads(cfg) == training_threads(cfg)
    cfg = compose_config("threads=1", "latency.threads=2", output_dir=tmp_path)
    import torch

    before = torch.get_num_threads()
    try:
        assert apply_threads(cfg)["train"] == 1 and torch.get_num_threads() == 1 and latency_threads(cfg) == 2
    finally:
        torch.set_num_threads(before)


def test_teacher_cache_detects_a_corrupt_entry_and_rebuilds_it(tmp_path):
    cfg = compose_config("model=dlrm", f"paths.log_dir={tmp_path}", "teacher_cache=true", output_dir=tmp_path / "run")
    material = key_material(cfg, 1, None)
    assert cache_key(material) == cache_key(key_material(cfg, 1, None)) != cache_key(key_material(cfg, 2, None))
    fits = []

    def fit() -> str:
        path = tmp_path / f"fit{len(fits)}.ckpt"
        path.write_bytes(b"weights" * 100)
        fits.append(path)
        return str(path)

    first, rec = dense_teacher(cfg, tmp_path / "run1", 1, None, fit, multirun=False)
    assert not rec["hit"] and len(fits) == 1 and valid_entry(Path(rec["entry"]))
    second, rec = dense_teacher(cfg, tmp_path / "run2", 1, None, fit, multirun=False)
    assert rec["hit"] and len(fits) == 1 and Path(second).read_bytes() == Path(first).read_bytes()
    entry = Path(rec["entry"])
    (entry / "teacher.ckpt").unlink()
    (entry / "teacher.ckpt").write_bytes(b"weightz" * 100)  # same size, other bytes
    assert not valid_entry(entry)
    _, rec = dense_teacher(cfg, tmp_path / "run3", 1, None, fit, multirun=False)
    assert not rec["hit"] and len(fits) == 2 and valid_entry(entry)
    (entry / "complete.json").unlink()  # a fit that died before its record
    assert not valid_entry(entry)
    off = compose_config("model=dlrm", f"paths.log_dir={tmp_path}", output_dir=tmp_path / "run4")
    assert dense_teacher(off, tmp_path / "run4", 1, None, fit, multirun=False)[1] is None  # default: multirun only
    store(entry, Path(first), material)
    assert valid_entry(entry)


def test_a_cached_teacher_finishes_the_jobs_dense_phase_so_a_resume_never_fits_it(tmp_path):
    """A cache hit leaves the job's dense phase finished (final.ckpt and its completion record): resuming
    that job, where the cache is off (not a multirun process), restores the phase instead of fitting."""
    cfg = compose_config("model=dlrm", f"paths.log_dir={tmp_path}", "teacher_cache=true", output_dir=tmp_path / "job")
    fits = []

    def fit() -> str:
        fits.append(1)
        path = tmp_path / "fitted.ckpt"
        path.write_bytes(b"weights" * 100)
        return str(path)

    dense_teacher(cfg, tmp_path / "first", 1, None, fit, multirun=False)
    path, rec = dense_teacher(cfg, tmp_path / "job", 1, None, fit, multirun=False)
    assert rec["hit"] and Path(path) == tmp_path / "job" / "checkpoints" / "dense" / "final.ckpt" and len(fits) == 1
    record = read_record(tmp_path / "job" / "checkpoints" / "dense")
    assert record["done"] and record["checkpoint"] == "final.ckpt" and record["teacher_cache"] == rec

    restored = []
    off = compose_config("model=dlrm", f"paths.log_dir={tmp_path}", output_dir=tmp_path / "job")
    path, again = dense_teacher(off, tmp_path / "job", 1, None, lambda: restored.append(1) or path, multirun=False)
    assert again == rec and restored == [1] and len(fits) == 1  # fit() restores the finished phase (fit_phase)


def test_a_sweep_over_a_config_group_has_one_dir_and_a_summary_with_its_failed_job(tmp_path):
    """``-m`` over pruner=none,d2s (two task names) and a job with a bad setting: one sweep dir, every job
    its own dir, the other jobs still run, and the summary says which failed and why."""
    proc, sweep = multirun(tmp_path, *TINY_STREAM, "pruner=none,d2s", "data.limit_rows=3000,0")
    assert proc.returncode != 0  # Hydra reports the failed jobs at the end
    rows = read_rows(sweep)
    assert len(rows) == 4 and sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    d2s = [r for r in rows if "pruner=d2s" in r["overrides"] and "limit_rows=3000" in r["overrides"]]
    assert len(d2s) == 1 and d2s[0]["status"] == "completed" and float(d2s[0]["sparsity"]) > 0.5
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and all("limit_rows=0" in r["overrides"] and "DataError" in r["error"] for r in failed)
    assert (sweep / "summary.md").is_file() and (sweep / "multirun.yaml").is_file()


def test_a_d2s_sweep_trains_the_dense_reference_once(tmp_path):
    """Two D2S targets in one sweep: the first job trains the stream's dense reference, the second restores it
    from the teacher cache (same per-window figures), and each job still prunes to its own target."""
    proc, sweep = multirun(tmp_path, *TINY_STREAM, "pruner=d2s", "data.limit_rows=3000", "pruner.update_every=5",
                           "pruner.target_sparsity=0.5,0.8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((sweep / job / "results.json").read_text()) for job in ("0", "1")]
    assert [r["teacher_cache"]["hit"] for r in results] == [False, True]
    assert results[1]["dense"]["per_window"] == results[0]["dense"]["per_window"]
    assert (sweep / "1" / "checkpoints" / "dense" / "complete.json").is_file()
    assert [round(r["pruner"]["overall"], 1) for r in results] == [0.5, 0.8]


@pytest.mark.slow
def test_joblib_sweep_of_two_sparsities_fits_the_teacher_once(tmp_path):
    """Two ToP jobs in parallel worker processes (joblib; the BERT folder resolver registered there) share one
    dense teacher: one job fits it, the other waits for the cache entry and loads it. The cache stores only a
    teacher that beats the majority class (issue 35), so the jobs fit a tiny BERT that learns its data: a
    sentence is positive when it says "good" (10 epochs of 8 steps reach validation accuracy 1.0)."""
    from conftest import TINY_BERT_CONFIG

    data = tmp_path / "words.csv"
    data.write_text("text,label\n" + "".join(f"{w} film number {i},{int(w == 'good')}\n" for i, w in enumerate(["good", "bad"] * 80)))
    tiny = ",".join(f"{k}:{v}" for k, v in TINY_BERT_CONFIG.items())
    proc, sweep = multirun(
        tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "experiment=smoke", "pruner.target_sparsity=0.4,0.6",
        "pruner.teacher_epochs=10", "pruner.pruning_epochs=1", "threads=1", "latency.batch_sizes=[1]", "latency.repeats=2",
        "data=text_csv", f"data.path={data}", "data.limit_per_split=null", "data.batch_size=16", f"model.module.bert_config={{{tiny}}}",
        "model.module.lr=3e-3", "callbacks.early_stopping=null", "trainer.limit_train_batches=null",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(sweep)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    results = [json.loads((sweep / r["job"] / "results.json").read_text()) for r in rows]
    assert sorted(r["teacher_cache"]["hit"] for r in results) == [False, True]
    assert all(r["dense"]["beats_majority_class"] and r["teacher_cache"]["stored"] for r in results)
    assert len({r["teacher_cache"]["key"] for r in results}) == 1
    assert sum((sweep / r["job"] / "csv" / "dense").is_dir() for r in rows) == 1  # one dense fit
    for r in results:
        assert r["dense"]["metrics"] == results[0]["dense"]["metrics"] and r["threads"]["train"] == 1
        assert not Path(r["dense"]["checkpoint"]).is_absolute()  # linked into the run dir
    assert len(list((tmp_path / "teacher_cache").glob("*/complete.json"))) == 1


@pytest.mark.parametrize("search", ["top_optuna", "d2s_optuna"])
def test_every_search_composes_with_two_objectives_over_existing_settings(search, tmp_path):
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=[f"hparams_search={search}", f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and len(cfg.optimized_metric) == 2
    assert list(cfg.hydra.sweeper.direction) == ["maximize", "maximize"]
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key


def test_d2s_optuna_search_writes_the_pareto_front(tmp_path):
    proc, sweep = multirun(tmp_path, "hparams_search=d2s_optuna", "hydra.sweeper.n_trials=3",
                           "hydra.sweeper.sampler.population_size=2", "data.limit_rows=3000",
                           *[o for o in TINY_STREAM if not o.startswith("model=")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(sweep)
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    front = [r for r in rows if r["pareto"] == "True"]
    assert front and all(r["objective_1"] == r["sparsity"] for r in rows)
    assert "## Pareto front" in (sweep / "summary.md").read_text() and (sweep / "pareto.png").is_file()
    assert (sweep / "optimization_results.yaml").is_file()  # Optuna's own record


@pytest.mark.parametrize("launcher, target", [("submitit_local", "LocalLauncher"), ("submitit_slurm", "SlurmLauncher")])
def test_submitit_launchers_compose_with_the_keys_the_readme_documents(launcher, target, tmp_path):
    """The submitit launchers docs/distributed.md documents (a sweep's jobs run through them as through joblib, whose
    two-job sweep above runs for real: both import the task function and its resolvers the same way)."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", f"paths.output_dir={tmp_path}"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    documented = {"timeout_min", "cpus_per_task", "mem_gb", "gpus_per_node", "nodes"}
    if launcher == "submitit_slurm":
        documented |= {"partition", "account", "qos", "array_parallelism"}
    assert documented <= set(cfg.hydra.launcher), documented - set(cfg.hydra.launcher)


def test_multirun_job_is_named_after_its_overrides_and_grouped_by_sweep(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from conftest import CONF
    from pipelines.sweep import multirun_job

    assert multirun_job() is None  # outside Hydra
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=[f"paths.log_dir={tmp_path}"], return_hydra_config=True)
    cfg.hydra.mode = "MULTIRUN"
    cfg.hydra.job.override_dirname = "pruner.target_sparsity=0.4"
    cfg.hydra.sweep.dir = str(tmp_path / "multiruns" / "2026-01-01_00-00-00")
    HydraConfig.instance().set_config(cfg)
    try:
        assert multirun_job() == {"name": "pruner.target_sparsity=0.4", "group": "2026-01-01_00-00-00"}
    finally:
        HydraConfig.instance().cfg = None
