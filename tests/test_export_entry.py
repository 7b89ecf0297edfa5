"""``export.py run_dir=DIR`` on runs that cannot be exported: a clear error, status 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from modules.core.errors import ConfigError, MissingFileError
from pipelines.reexport import RunDirError, reexport
from tests.conftest import compose_config
from tests.processes import run_script


def fake_run(tmp_path: Path, results: dict | str | None) -> Path:
    """A run dir with the saved config of ``model=bert pruner=top`` and the given results.json."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_config("model=bert", "pruner=top", output_dir=run), run / ".hydra" / "config.yaml")
    if results is not None:
        (run / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    return run


def test_missing_run_dir_is_one_line_status_2_and_creates_nothing(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = run_script("export.py", [f"run_dir={missing}"], timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is not a folder" in lines[0]
    assert not missing.exists()


@pytest.mark.parametrize(
    "results, error, message",
    [
        (None, MissingFileError, "did not finish"),
        ("{not json", RunDirError, "not valid JSON"),
        ({"task": "bert-top"}, RunDirError, "names no model checkpoint"),
        ({"dense": {"checkpoint": "checkpoints/dense/gone.ckpt", "metrics": {}}}, MissingFileError, "is missing"),
    ],
)
def test_unexportable_runs_say_why(tmp_path, results, error, message):
    run = fake_run(tmp_path, results)
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(error, match=message):
        reexport(run)
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written, nothing damaged


def test_an_unknown_model_name_lists_the_runs_models(tmp_path):
    run = fake_run(tmp_path, {"dense": {"checkpoint": "d.ckpt", "metrics": {}}, "pruned": {"checkpoint": "p.ckpt", "metrics": {}}})
    with pytest.raises(ConfigError, match=r"models=\['uniform'\]: this run has the models \['dense', 'pruned'\]"):
        reexport(run, names=["uniform"])


def test_a_folder_that_is_not_a_run_dir(tmp_path):
    with pytest.raises(MissingFileError, match="not a run dir"):
        reexport(tmp_path)
