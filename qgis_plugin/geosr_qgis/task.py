"""The background task: one geosr run in a QgsTask, progress from the library's callback, Cancel via
``isCanceled()`` (the library's ``should_stop``)."""

from __future__ import annotations

import traceback
from typing import Callable

from qgis.core import Qgis, QgsMessageLog, QgsTask

from .backend import RunCancelled, RunError

LOG_TAG = "geosr"


class GeosrTask(QgsTask):
    """Runs ``job(progress, should_stop)`` off the main thread; ``on_finished(task)`` runs on the main thread
    with ``task.result``, ``task.error`` (one line) or ``task.cancelled`` set."""

    def __init__(self, description: str, job: Callable, on_finished: Callable[["GeosrTask"], None]):
        super().__init__(description, QgsTask.CanCancel)
        self.job = job
        self.on_finished = on_finished
        self.result = None
        self.error: str | None = None
        self.cancelled = False

    def _progress(self, done: int, total: int, message: str) -> None:
        if total > 0:
            self.setProgress(100.0 * done / total)

    def run(self) -> bool:  # worker thread: no widgets here
        try:
            self.result = self.job(self._progress, self.isCanceled)
            return True
        except RunCancelled:
            self.cancelled = True
        except RunError as err:
            self.error = str(err)
        except Exception as err:  # a bug: one line for the user, the traceback in the log panel
            self.error = f"unexpected {type(err).__name__}: {err} (details in the geosr log panel)"
            QgsMessageLog.logMessage(traceback.format_exc(), LOG_TAG, Qgis.Critical)
        return False

    def finished(self, ok: bool) -> None:  # main thread
        if not ok and self.error is None:
            self.cancelled = True  # cancelled before it started, or while running
        self.on_finished(self)
