"""How the plugin reaches geosr: in QGIS's own Python when it imports there, else the configured interpreter's
``geosr`` command line in a subprocess (an argument list, never a shell string), with progress streamed back.

No QGIS imports here. Both backends take the library's callbacks: ``progress(done, total, message)`` and
``should_stop()``; both raise :class:`RunError` (one line for the message bar) or :class:`RunCancelled`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .options import (EnhanceOptions, ModalitiesOptions, ScoreOptions, lock_owner, output_lock, partial_outputs,
                      partial_store)

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
ShouldStop = Callable[[], bool]

AUTO, IN_PROCESS, SUBPROCESS = "auto", "inprocess", "subprocess"
BACKENDS = (AUTO, IN_PROCESS, SUBPROCESS)
TERMINATE_GRACE_S = 15.0  # after SIGTERM, geosr removes its partial output and exits; then it is killed


class RunError(Exception):
    """geosr refused or failed; ``str()`` is one line for the user (no traceback)."""


class RunCancelled(Exception):
    """The user cancelled; geosr left no output."""


# ---------------------------------------------------------------------------------------------------------------
# the subprocess's output


@dataclass(frozen=True)
class ProgressEvent:
    done: int
    total: int
    message: str


def parse_line(line: str) -> ProgressEvent | None:
    """A ``--progress-json`` line -> ProgressEvent; any other line (warnings, results) -> None."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("event") != "progress":
        return None
    try:
        return ProgressEvent(int(event["done"]), int(event["total"]), str(event.get("message", "")))
    except (KeyError, TypeError, ValueError):
        return None


def error_message(lines: Iterable[str], returncode: int) -> str:
    """The one line to show when the subprocess failed: geosr's own ``geosr: error: ...`` line if there is one,
    else the last line of output (a crash), else the exit status."""
    lines = [ln.strip() for ln in lines if ln.strip() and parse_line(ln) is None]
    for ln in reversed(lines):
        if ln.startswith("geosr: error:"):
            return ln[len("geosr: error:"):].strip()
    if lines:
        return f"geosr stopped with exit status {returncode}: {lines[-1]}"
    return f"geosr stopped with exit status {returncode} and no message"


# ---------------------------------------------------------------------------------------------------------------
# backends


class SubprocessBackend:
    """Runs ``INTERPRETER -m geosr ...`` with ``--progress-json``; Cancel sends SIGTERM (geosr then removes its
    partial output), and kills it if it has not stopped after TERMINATE_GRACE_S."""

    name = SUBPROCESS

    def __init__(self, interpreter: str, pythonpath: str | None = None):
        if not interpreter:
            raise RunError("geosr does not import in QGIS's Python and no interpreter is set: choose the Python "
                           "that has geosr installed in the geosr plugin settings")
        self.interpreter = str(interpreter)
        self.pythonpath = pythonpath or None
        self.process: subprocess.Popen | None = None  # the latest run's process (tests check it is gone)

    def command(self, args: list[str]) -> list[str]:
        return [self.interpreter, "-m", "geosr", *args]

    def environment(self) -> dict[str, str]:
        """QGIS's environment without what points Python at QGIS's own libraries (PYTHONHOME, PYTHONPATH)."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        return env

    def version(self) -> str:
        """``geosr X.Y.Z`` from the interpreter, or RunError saying why it does not run."""
        lines = self._run(["--version"], None, None, progress_json=False)
        return lines[-1].strip() if lines else ""

    def _run(self, args: list[str], progress: Progress | None, should_stop: ShouldStop | None, *,
             progress_json: bool = True, output: str | None = None) -> list[str]:
        cmd = self.command(args + (["--progress-json"] if progress_json else []))
        log.info("running %s", cmd)
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window on Windows
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, encoding="utf-8", errors="replace", bufsize=1,
                                    env=self.environment(), creationflags=flags)
        except OSError as err:
            raise RunError(f"cannot run {self.interpreter}: {err.strerror or err}; check the interpreter in the "
                           "geosr plugin settings") from err
        self.process = proc
        lines_q: queue.Queue = queue.Queue()

        def pump():
            for ln in proc.stdout:
                lines_q.put(ln)
            lines_q.put(None)

        reader = threading.Thread(target=pump, name="geosr-output", daemon=True)
        reader.start()
        lines: list[str] = []
        cancelled = False
        stop_sent = 0.0
        finished = False
        while not finished:
            try:
                ln = lines_q.get(timeout=0.1)
            except queue.Empty:
                ln = ""
            if ln is None:
                finished = True
            elif ln:
                event = parse_line(ln)
                if event is None:
                    lines.append(ln.rstrip("\n"))
                elif progress is not None:
                    progress(event.done, event.total, event.message)
            if not cancelled and should_stop is not None and should_stop():
                cancelled = True
                stop_sent = time.monotonic()
                proc.terminate()
            if cancelled and proc.poll() is None and time.monotonic() - stop_sent > TERMINATE_GRACE_S:
                proc.kill()
        returncode = proc.wait()
        reader.join(timeout=5)
        proc.stdout.close()
        if cancelled and returncode != 0:  # (exit 0: it finished before the Cancel arrived; the output is there)
            owner = lock_owner(output) if output else None
            # killed before it could clean up (or Windows, where terminate is a kill); never while another run holds
            # the output (this one was refused)
            if output and owner in (None, proc.pid):
                for p in partial_outputs(output):
                    p.unlink(missing_ok=True)
                shutil.rmtree(partial_store(output), ignore_errors=True)  # a Cancel keeps nothing for a resume
                if owner is not None:  # its lock: the process has exited
                    output_lock(output).unlink(missing_ok=True)
            raise RunCancelled("cancelled")
        if returncode != 0:
            raise RunError(error_message(lines, returncode))
        return lines

    def enhance(self, opts: EnhanceOptions, progress: Progress | None = None,
                should_stop: ShouldStop | None = None) -> str:
        self._run(opts.cli_args(), progress, should_stop, output=opts.output)
        return str(opts.output)

    def modalities(self, opts: ModalitiesOptions, progress: Progress | None = None,
                   should_stop: ShouldStop | None = None) -> str:
        self._run(opts.cli_args(), progress, should_stop)
        return str(opts.output)

    def score(self, opts: ScoreOptions, progress: Progress | None = None,
              should_stop: ShouldStop | None = None) -> dict:
        self._run(opts.cli_args(), progress, should_stop)
        return json.loads(Path(opts.json).read_text(encoding="utf-8"))


class InProcessBackend:
    """Calls the library in this Python (QGIS's), the same entry points the CLI calls."""

    name = IN_PROCESS

    @staticmethod
    def _call(fn, *args, **kwargs):
        from geosr.errors import GeosrError
        from geosr.scene import Cancelled

        try:
            return fn(*args, **kwargs)
        except Cancelled as err:
            raise RunCancelled("cancelled") from err
        except GeosrError as err:
            raise RunError(str(err)) from err

    def version(self) -> str:
        import geosr

        return f"geosr {geosr.__version__}"

    def enhance(self, opts: EnhanceOptions, progress: Progress | None = None,
                should_stop: ShouldStop | None = None) -> str:
        from geosr.config import EnhanceConfig
        from geosr.scene import enhance_scene

        config = EnhanceConfig(**opts.config_kwargs())
        result = self._call(enhance_scene, opts.input, opts.output, config, progress=progress,
                            should_stop=should_stop)
        return str(result.path)

    def modalities(self, opts: ModalitiesOptions, progress: Progress | None = None,
                   should_stop: ShouldStop | None = None) -> str:
        from geosr.config import ModalitiesConfig
        from geosr.modalities import extract_modalities

        result = self._call(extract_modalities, opts.input, opts.output, ModalitiesConfig(**opts.config_kwargs()),
                            progress=progress, should_stop=should_stop)
        return str(result.folder)

    def score(self, opts: ScoreOptions, progress: Progress | None = None,
              should_stop: ShouldStop | None = None) -> dict:
        from geosr.config import ScoreConfig
        from geosr.scoring import score_scene

        def checked(done, total, message):  # score_scene takes no should_stop: stop at its next step
            if should_stop is not None and should_stop():
                from geosr.scene import Cancelled

                raise Cancelled("cancelled")
            if progress is not None:
                progress(done, total, message)

        result = self._call(score_scene, opts.sr, opts.lr, config=ScoreConfig(lpips=opts.lpips), progress=checked,
                            **opts.library_kwargs())
        return result.report


NATIVE_GEO = ("rasterio", "pyproj", "pyogrio")  # geosr's modules that link GDAL / PROJ


def bundled_native_libraries(modules=NATIVE_GEO) -> list[str]:
    """Those of ``modules`` installed from wheels that carry their own GDAL / PROJ (``rasterio.libs/``,
    ``pyproj.libs/`` beside the package, or ``.dylibs/`` inside it).

    Loaded into QGIS, they bring a second GDAL / PROJ into a process that already has QGIS's: found here with
    the project's venv on QGIS 3.22, where the first in-process run worked and the second segfaulted in pyproj.
    """
    found = []
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin:
            continue
        package = Path(spec.origin).parent
        if (package.parent / f"{name}.libs").is_dir() or (package / ".dylibs").is_dir():
            found.append(name)
    return found


def geosr_importable() -> bool:
    """Whether ``geosr`` and what its entry point needs import in this Python (without importing torch)."""
    try:
        if importlib.util.find_spec("geosr") is None:
            return False
        import geosr

        return (hasattr(geosr, "__version__") and importlib.util.find_spec("geosr.scene") is not None
                and all(importlib.util.find_spec(m) is not None for m in ("torch", "rasterio", "numpy")))
    except Exception:  # a broken install counts as absent: the subprocess path still works
        return False


def in_process_safe() -> bool:
    """``auto`` runs geosr in-process only when it imports and its GDAL / PROJ are not a second copy (wheels)."""
    return geosr_importable() and not bundled_native_libraries()


def choose_backend(mode: str = AUTO, interpreter: str | None = None, pythonpath: str | None = None,
                   importable: Callable[[], bool] = geosr_importable,
                   safe: Callable[[], bool] = in_process_safe):
    """The backend for the settings: ``inprocess`` (geosr must import here), ``subprocess`` (the interpreter's
    CLI), or ``auto``: in-process when geosr imports in this Python without its own copy of GDAL / PROJ, else the
    subprocess (with no interpreter set, the in-process library if it imports at all)."""
    if mode not in BACKENDS:
        raise RunError(f"unknown backend {mode!r} in the geosr plugin settings; choose {', '.join(BACKENDS)}")
    if mode == IN_PROCESS:
        if not importable():
            raise RunError(f"geosr does not import in this Python ({sys.executable}); set the backend to auto "
                           "or subprocess and choose an interpreter in the geosr plugin settings")
        return InProcessBackend()
    if mode == AUTO and (safe() or (not interpreter and importable())):
        return InProcessBackend()
    return SubprocessBackend(interpreter or "", pythonpath)
