"""Benchmark of the chunked Criteo reader: peak memory and rows per second by file size.

    python benchmarks/stream_reader.py [--rows 2000000] [--small 500000]

Writes a Criteo-format TSV file of ``--rows`` rows (label, 13 integers, 26 hashed
categoricals, 20% of fields empty) and one of its first ``--small`` rows in a temporary
dir, then reads each in a fresh process with ``CriteoStream.load`` (the chunked reader,
``modules/data/stream_readers.py``) and records its wall-clock rows per second and peak
resident memory (``ru_maxrss``), the memory after imports, and the size of the encoded
arrays the stream keeps. Also: the large file with ``limit_rows=--small`` (reading stops
there), and, as the reference for the earlier reader, pandas reading the large file whole
as strings (``read_csv(dtype=str)``, what the reader did before chunking).
Summary: ``benchmarks/results/stream_reader.json`` (with the command and the load
average before and after, ``uptime``: figures from a busy machine are slower, not
smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "stream_reader.json"


def write_criteo(path: Path, rows: int, seed: int = 0, chunk: int = 100_000) -> None:
    """A Criteo-format TSV file of ``rows`` random rows (20% of integer and categorical fields empty)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            cols = {"label": rng.integers(0, 2, n).astype(str)}
            for i in range(13):
                v = rng.integers(0, 1000, n).astype(str).astype(object)
                v[rng.random(n) < 0.2] = ""
                cols[f"I{i}"] = v
            for i in range(26):
                v = np.char.mod("%08x", rng.integers(0, 2**31, n)).astype(object)
                v[rng.random(n) < 0.2] = ""
                cols[f"C{i}"] = v
            pd.DataFrame(cols).to_csv(f, sep="\t", header=False, index=False)


def child(path: str, limit: int | None, mode: str) -> dict:
    """Read ``path`` once in this process; rows, seconds, peak RSS (MiB) and the RSS after imports."""
    import numpy as np  # noqa: F401
    import pandas as pd
    import torch

    sys.path.insert(0, str(ROOT))
    from modules.data.stream_data import CRITEO_COLUMNS, CriteoStream

    torch.set_num_threads(1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if mode == "pandas_whole_file_as_strings":
        df = pd.read_csv(path, sep="\t", header=None, names=CRITEO_COLUMNS, dtype=str, keep_default_na=False, quoting=3)
        rows, kept = len(df), int(df.memory_usage(deep=True).sum())
    else:
        s = CriteoStream(path=path, window=100_000, limit_rows=limit).load()
        rows = len(s)
        kept = sum(t.numel() * t.element_size() for t in (s.dense, s.sparse, s.multi, s.label, s.timestamp, s.window))
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_imports_mib": round(base, 1), "kept_data_mib": round(kept / 2**20, 1)}


def run_child(path: Path, limit: int | None, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--limit", str(limit or 0), "--mode", mode]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--small", type=int, default=500_000)
    ap.add_argument("--child")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--mode", default="chunked")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.limit or None, args.mode)))
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big.tsv", Path(tmp) / "small.tsv"
        t0 = time.perf_counter()
        write_criteo(big, args.rows)
        with big.open("rb") as src, small.open("wb") as dst:
            for _, line in zip(range(args.small), src):
                dst.write(line)
        written = time.perf_counter() - t0
        runs = []
        for name, path, limit, mode in (
            (f"chunked, {args.small:,}-row file", small, None, "chunked"),
            (f"chunked, {args.rows:,}-row file", big, None, "chunked"),
            (f"chunked, {args.rows:,}-row file, limit_rows={args.small:,}", big, args.small, "chunked"),
            (f"earlier reader's first step: pandas reads the {args.rows:,}-row file whole as strings", big, None,
             "pandas_whole_file_as_strings"),
        ):
            r = run_child(path, limit, mode)
            r.update(name=name, file_mib=round(path.stat().st_size / 2**20, 1))
            runs.append(r)
            print(json.dumps(r))
    summary = {
        "command": "python benchmarks/stream_reader.py" + (f" --rows {args.rows}" if args.rows != 2_000_000 else "")
        + (f" --small {args.small}" if args.small != 500_000 else ""),
        "what": "CriteoStream.load (modules/data/stream_readers.py: 100,000-row chunks, each encoded at once) on random "
        "Criteo-format files, each read in a fresh process, one torch thread; peak_rss_mib is the process's ru_maxrss, "
        "kept_data_mib the encoded arrays the stream keeps (or the string frame's deep size for the pandas reference)",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "seconds_to_write_files": round(written, 1),
        "runs": runs,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
