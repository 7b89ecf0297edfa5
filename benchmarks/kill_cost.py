"""Benchmark of what a kill costs: SIGKILL a real run mid-phase, ``resume=DIR``, measure the work redone.

    python benchmarks/kill_cost.py --name top --phase pruned --writes 2 --wait 30 -- model=bert pruner=top
    python benchmarks/kill_cost.py --name swiftpruner --phase pruned --watch search_state.pt --writes 2 --wait 20 \\
        -- model=bert pruner=swiftpruner
    python benchmarks/kill_cost.py --name d2s --phase dense --writes 8 --wait 1 -- model=dlrm pruner=d2s
    python benchmarks/kill_cost.py --name none --phase dense --writes 2 --wait 20 -- model=bert pruner=none

Each case starts ``python run.py <overrides> hydra.run.dir=<tmp>/run`` in its own process
group, watches the phase's resumable checkpoint (``checkpoints/<phase>/last.ckpt``, or
``--watch``, e.g. SwiftPruner's per-generation ``search_state.pt``), and after ``--writes``
writes of it waits ``--wait`` seconds and kills the whole group with SIGKILL. Then it runs
``python run.py resume=<tmp>/run`` to the end (``--no-finish``: until it has written a newer
checkpoint than the one it continued from).

A kill costs the work done since the last checkpoint write (``lost_s``: kill time minus the
write's time; the resumed run does that work again at the same speed) plus the resumed
run's start-up (``startup_s``: from its launch to the line saying it restored the phase,
Lightning's "Restored all states" or SwiftPruner's "continuing the search"). The benchmark
checks that the resume really continued from the newest checkpoint: the global step the
resumed run records (``checkpoints/resumed.json``) must equal the step stored in that
checkpoint at kill time (or its generation, for a search state). ``interval_s`` is the
time between the checkpoint writes seen before the kill. The resumed run must finish with a
results.json. Summary: ``benchmarks/results/kill_cost.json`` (cases are merged by name, each
with its command; the load average before and after is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.resume import resumed_events  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "kill_cost.json"
RESTORED = re.compile(r"Restored all states from the checkpoint|continuing the search from")
GENERATION = re.compile(r"continuing the search from .* \(generation (\d+)\)")


class TimedOutput:
    """Reads a child's combined output in a thread, keeping (time, line) pairs (progress bars split on \\r)."""

    def __init__(self, proc: subprocess.Popen, log_path: Path):
        self.lines: list[tuple[float, str]] = []
        self._log = log_path.open("a")
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        buf = ""
        for chunk in iter(lambda: proc.stdout.read1(4096).decode(errors="replace"), ""):
            buf += chunk
            *done, buf = re.split(r"[\r\n]", buf)
            now = time.time()
            for line in done:
                if line.strip():
                    self.lines.append((now, line))
                    self._log.write(f"{now:.3f} {line}\n")
        self._log.flush()

    def first(self, pattern: re.Pattern) -> float | None:
        """Time of the first line matching ``pattern`` (None: no such line)."""
        return next((t for t, line in self.lines if pattern.search(line)), None)

    def join(self) -> None:
        self._thread.join(timeout=30)
        self._log.close()


def launch(args: list[str], log_path: Path) -> tuple[subprocess.Popen, TimedOutput, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    started = time.time()
    proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, TimedOutput(proc, log_path), started


def stored_step(path: Path) -> int:
    """The global step (Lightning checkpoint) or completed generations (search state) stored in ``path``."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if "global_step" in state:
        return int(state["global_step"])
    return int(state["evolution"]["completed_generations"])


def run_case(name: str, phase: str, watch: str, writes: int, wait: float, overrides: list[str], work: Path,
             finish: bool = True) -> dict:
    """Kill one run after ``writes`` writes of its watched file plus ``wait`` s; resume it; measure.

    With ``finish`` False the resumed run is stopped once it has written a newer checkpoint (it
    continued past the kill), instead of running to the end."""
    run_dir = work / "run"
    log_path = work / "output.log"
    watched = run_dir / "checkpoints" / phase / watch
    proc, out, started = launch([*overrides, f"hydra.run.dir={run_dir}"], log_path)
    seen: list[float] = []
    last = None
    while len(seen) < writes:
        if proc.poll() is not None:
            raise SystemExit(f"{name}: the run ended (status {proc.returncode}) before {writes} writes of {watched}; "
                             f"see {log_path}")
        if watched.is_file():
            mtime = watched.stat().st_mtime_ns
            if mtime != last:
                last = mtime
                seen.append(mtime / 1e9)
        time.sleep(0.2)
    time.sleep(wait)
    os.killpg(proc.pid, signal.SIGKILL)
    killed = time.time()
    proc.wait()
    out.join()
    ckpt_step = stored_step(watched)
    last_write = watched.stat().st_mtime_ns / 1e9  # after the kill: a write that landed during the wait counts
    if last_write != seen[-1]:
        seen.append(last_write)
    writes_before_kill = [round(t - started, 2) for t in seen]

    proc, out2, resumed_at = launch([f"resume={run_dir}"], log_path)
    if finish:
        status = proc.wait()
    else:  # stop the resumed run once it has written a newer checkpoint than the one it continued from
        seen_mtime = watched.stat().st_mtime_ns
        while proc.poll() is None:
            time.sleep(1.0)
            if watched.is_file() and watched.stat().st_mtime_ns != seen_mtime:
                seen_mtime = watched.stat().st_mtime_ns
                if stored_step(watched) > ckpt_step:
                    break
        os.killpg(proc.pid, signal.SIGKILL)
        status = proc.wait()
    finished = time.time()
    out2.join()
    restored = out2.first(RESTORED)
    generation = next((int(m.group(1)) for _, line in out2.lines if (m := GENERATION.search(line))), None)
    event = next((e for e in resumed_events(run_dir) if e["phase"] == phase), None)
    results_file = run_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    # a Lightning checkpoint: the step the resume recorded; a search state: the generation it continued from
    resumed_from = (event or {}).get("global_step") if watch.endswith(".ckpt") else generation
    return {
        "overrides": overrides,
        "phase": phase,
        "watched": f"checkpoints/{phase}/{watch}",
        "writes_before_kill_s": writes_before_kill,
        "killed_after_s": round(killed - started, 2),
        "interval_s": round(max(gaps), 2) if gaps else None,
        "lost_s": round(killed - last_write, 2),
        "startup_s": round(restored - resumed_at, 2) if restored else None,
        "kill_cost_s": round(killed - last_write + (restored - resumed_at), 2) if restored else None,
        "step_in_checkpoint_at_kill": ckpt_step,
        "resumed_from_step": resumed_from,
        "resumed_from_newest_checkpoint": resumed_from == ckpt_step,
        "resumed_run": "ran to the end" if finish else "stopped once it wrote a newer checkpoint",
        "resumed_run_status": status,
        "resumed_run_wall_clock_s": round(finished - resumed_at, 1),
        "finished_with_results": bool(results),
        "results_resumed": results.get("resumed"),
        "threads": results.get("threads"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="case name in the summary (e.g. the pruner)")
    ap.add_argument("--phase", required=True, help="phase to kill: dense, pruned or a baseline's name")
    ap.add_argument("--watch", default="last.ckpt", help="file in checkpoints/<phase>/ whose writes are counted")
    ap.add_argument("--writes", type=int, default=2, help="writes of the watched file before the kill timer starts")
    ap.add_argument("--wait", type=float, default=20.0, help="seconds after that write before SIGKILL")
    ap.add_argument("--no-finish", action="store_true",
                    help="stop the resumed run once it writes a newer checkpoint instead of running it to the end")
    ap.add_argument("--work", type=Path, default=None, help="where the run goes (default: a temporary dir)")
    ap.add_argument("overrides", nargs="*", help="run.py overrides (after --)")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix=f"kill_cost_{a.name}_"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    case = run_case(a.name, a.phase, a.watch, a.writes, a.wait, a.overrides, work, finish=not a.no_finish)
    case["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    case["command"] = ("python benchmarks/kill_cost.py --name {} --phase {} --watch {} --writes {} --wait {}{} -- {}"
                       .format(a.name, a.phase, a.watch, a.writes, a.wait, " --no-finish" if a.no_finish else "",
                               " ".join(a.overrides)))
    summary = json.loads(OUT.read_text()) if OUT.is_file() else {}
    summary["description"] = ("SIGKILL a run mid-phase, resume=DIR, and measure the work redone: lost_s (since the "
                              "last checkpoint write) + startup_s (resume launch to the phase restored); "
                              "see benchmarks/kill_cost.py")
    summary.setdefault("cases", {})[a.name] = case
    OUT.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(case, indent=1))


if __name__ == "__main__":
    main()
