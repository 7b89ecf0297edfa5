"""modules.core.files and modules.core.plots: atomic writes round-trip, and a failed write leaves the old file."""

from __future__ import annotations

import json

import pytest

from modules.core.files import atomic_path, write_bytes, write_json, write_text
from modules.core.plots import pyplot, save_figure


@pytest.mark.parametrize("fsync", [False, True])
def test_writes_round_trip_and_leave_no_temp_file(tmp_path, fsync):
    obj = {"a": [1, 2.5, None], "b": "é"}
    assert write_json(tmp_path / "d" / "x.json", obj, indent=1, fsync=fsync) == tmp_path / "d" / "x.json"
    assert json.loads((tmp_path / "d" / "x.json").read_text()) == obj
    assert (tmp_path / "d" / "x.json").read_text().endswith("}\n")
    write_text(tmp_path / "t.txt", "line\n", fsync=fsync)
    write_bytes(tmp_path / "b.bin", b"\x00\x01", fsync=fsync)
    assert (tmp_path / "t.txt").read_text() == "line\n" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["b.bin", "t.txt", "x.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        write_json(path, {"v": object()})  # not serialisable: raises before anything is renamed
    with pytest.raises(RuntimeError, match="half"):
        with atomic_path(path) as tmp:
            tmp.write_text('{"v": 2')
            raise RuntimeError("killed half way")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_block_that_writes_nothing_is_an_error_not_an_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "never.txt"):
            pass
    assert not (tmp_path / "never.txt").exists()


def test_save_figure_writes_a_png_and_closes_the_figure(tmp_path):
    plt = pyplot()
    assert plt.get_backend().lower() == "agg"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "p" / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in path.parent.iterdir()] == ["f.png"]
