"""Run an entry script (``run.py``, ``export.py``) in a process of its own, as a user's command would.

Every such process used to start a fresh interpreter, and importing Lightning, torchmetrics and
transformers takes about 13 s of a 2-core machine: most of the suite's time went to imports. Here
each run is a child of a fork server (``multiprocessing``'s ``forkserver``, started once per test
session) that has imported the project's modules already, so a run starts in a fraction of a second.
The child is a separate process (its own pid, killable with SIGKILL, its own exit status, its
output in files) that executes the script as ``__main__`` with the given arguments and environment,
exactly as ``python <script> <args>`` would after its imports. Two differences from a fresh
interpreter, both handled: variables read at interpreter start cannot change per run
(``PYTHONHASHSEED`` is fixed at 0 for the server and every child; ``PYTHONWARNINGS`` is applied
as warning filters in the child), and modules imported by the server saw the server's
environment (the offline settings of ``conftest.py``, which every run uses too).

``LITPRUNE_TEST_FRESH_INTERPRETER=1`` runs every script in a fresh interpreter instead
(``subprocess``), to check that nothing depends on the server.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: modules the fork server imports once (the entry scripts' imports, and the pipelines run.py imports late)
PRELOAD = ["run", "export", "pipelines.flow", "pipelines.tasks.text_classification", "pipelines.tasks.stream", "pipelines.reexport", __name__]
FRESH = os.environ.get("LITPRUNE_TEST_FRESH_INTERPRETER") == "1"

_context = None
_lock = threading.Lock()


def _forkserver():
    """The forkserver context, its server preloading :data:`PRELOAD` (started on first use)."""
    global _context
    with _lock:
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
            # The server is a new interpreter started with this environment: it must find the
            # project (Python 3.11's forkserver ignores the parent's sys.path when preloading).
            saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONHASHSEED")}
            # (This module may be imported as ``processes`` or ``tests.processes``: both must resolve there.)
            os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), *filter(None, [saved["PYTHONPATH"]])])
            os.environ["PYTHONHASHSEED"] = "0"
            try:
                from multiprocessing import forkserver

                forkserver.ensure_running()
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
        return _context


def _child(script: str, args: list[str], env: dict[str, str], cwd: str, out_path: str, err_path: str | None) -> None:
    """In the forked child: the environment, working dir and output files of the run, then the script as ``__main__``."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for action in filter(None, env.get("PYTHONWARNINGS", "").split(",")):  # actions only, e.g. "ignore"
        warnings.simplefilter(action.split(":")[0])
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = out if err_path is None else os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.argv = [script, *args]
    try:
        runpy.run_path(str(Path(cwd) / script), run_name="__main__")
    finally:
        # An interpreter's exit, in its order (multiprocessing's child would end with os._exit and skip the
        # atexit handlers): join the threads and run their exit hooks (joblib's worker pool shuts down
        # there), then the atexit handlers.
        threading._shutdown()
        atexit._run_exitfuncs()


class ScriptProcess:
    """``python <script> <args>`` running in its own process (see the module docstring).

    Mirrors the parts of ``subprocess.Popen`` the tests use: :attr:`pid`, :meth:`poll`,
    :meth:`kill` (SIGKILL), :meth:`wait`, :meth:`communicate` (text of stdout and stderr; with
    ``merge_stderr`` stderr is in stdout and the second item is ""), :attr:`returncode`
    (negative: killed by that signal).
    """

    def __init__(self, script: str, args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT,
                 merge_stderr: bool = False):
        self._dir = tempfile.TemporaryDirectory(prefix="litprune-run-")
        self._out = Path(self._dir.name) / "stdout"
        self._err = None if merge_stderr else Path(self._dir.name) / "stderr"
        env = dict(os.environ if env is None else env)
        self.args = [script, *args]
        if FRESH:
            with open(self._out, "w") as out, open(os.devnull if merge_stderr else self._err, "w") as err:
                # the child holds its own copies of the file descriptors; the parent's close here
                self._proc = subprocess.Popen([sys.executable, *self.args], cwd=cwd, env=env, stdout=out,
                                              stderr=subprocess.STDOUT if merge_stderr else err, stdin=subprocess.DEVNULL)
        else:
            self._proc = _forkserver().Process(
                target=_child, args=(script, list(args), env, str(cwd), str(self._out), None if merge_stderr else str(self._err)))
            self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if FRESH else self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.poll() if FRESH else self._proc.exitcode

    def kill(self) -> None:
        self._proc.kill()

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; raises ``subprocess.TimeoutExpired`` (after killing the run) past ``timeout`` s."""
        if FRESH:
            try:
                return self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                raise
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            self._proc.kill()
            self._proc.join()
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait (see :meth:`wait`); (stdout, stderr) as text."""
        self.wait(timeout)
        out = self._out.read_text(errors="replace")
        err = "" if self._err is None else self._err.read_text(errors="replace")
        self._dir.cleanup()
        return out, err


def run_script(script: str, args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python <script> <args>`` in the repository root to its end: a ``CompletedProcess`` with text output."""
    proc = ScriptProcess(script, args, env)
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
