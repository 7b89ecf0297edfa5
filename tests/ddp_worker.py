"""A worker for tests/test_ddp.py's 2-process gloo test of modules.distributed (kept light: spawned processes import it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from modules.distributed import broadcast, gather_objects, gather_rows, mean_, world_size  # noqa: E402


def collectives_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Join a 2-rank gloo group, run every collective helper, write what this rank got to ``<out_dir>/<rank>.json``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = gather_rows(torch.full((rank + 1, 2), float(rank)))  # uneven: 1 row on rank 0, 2 on rank 1
        t = torch.tensor([1.0 + rank])
        mean_([t])
        got = {"rows": rows.tolist(), "mean": t.item(), "b": broadcast(f"from {rank}"), "all": gather_objects(rank),
               "world": world_size()}
        Path(out_dir, f"{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()
