"""QGIS glue: the toolbar button, the settings dialog, the Processing provider, the task's result on the map."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsApplication, QgsMapLayerType, QgsProject, QgsRasterLayer
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (QAction, QComboBox, QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit,
                                 QPushButton)

from . import settings
from .backend import BACKENDS, RunError, choose_backend
from .dialog import EnhanceDialog
from .options import EnhanceOptions
from .provider import GeosrProvider
from .task import GeosrTask

ICON = Path(__file__).with_name("icon.svg")
TITLE = "geosr"
MENU = "&geosr"


class GeosrPlugin:
    def __init__(self, iface):
        self.iface = iface
        self.provider: GeosrProvider | None = None
        self.actions: list[QAction] = []
        self.tasks: list[GeosrTask] = []  # Python references keep running tasks alive

    # -- QGIS plugin interface --------------------------------------------------------------------------------
    def initProcessing(self):  # noqa: N802
        if self.provider is None:
            self.provider = GeosrProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):  # noqa: N802
        self.initProcessing()
        enhance = QAction(QIcon(str(ICON)), "Enhance with geosr", self.iface.mainWindow())
        enhance.setObjectName("geosrEnhance")
        enhance.setToolTip("Super-resolve the active raster layer with geosr")
        enhance.triggered.connect(self.run)
        self.iface.addToolBarIcon(enhance)
        self.iface.addPluginToRasterMenu(MENU, enhance)
        configure = QAction("geosr settings…", self.iface.mainWindow())
        configure.triggered.connect(self.show_settings)
        self.iface.addPluginToRasterMenu(MENU, configure)
        self.actions = [enhance, configure]

    def unload(self):
        for action in self.actions:
            self.iface.removePluginRasterMenu(MENU, action)
        if self.actions:
            self.iface.removeToolBarIcon(self.actions[0])
        self.actions = []
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

    # -- the button -------------------------------------------------------------------------------------------
    def run(self):
        layer = self.iface.activeLayer()
        if layer is None or layer.type() != QgsMapLayerType.RasterLayer:
            self.iface.messageBar().pushWarning(TITLE, "select a raster layer to enhance first")
            return
        dialog = EnhanceDialog(layer, self.iface.mainWindow())
        if not dialog.exec_():
            return
        try:
            options = dialog.options()
        except ValueError as err:
            self.iface.messageBar().pushWarning(TITLE, str(err))
            return
        self.start_enhance(options)

    def start_enhance(self, options: EnhanceOptions, backend=None) -> GeosrTask | None:
        """Run ``options`` in a background task; the result layer is added to the project when it is done."""
        try:
            options.cli_args()  # refuses what cannot be asked (e.g. an unknown modality) before a task starts
            backend = backend or settings.configured_backend()
        except (RunError, ValueError) as err:
            self.iface.messageBar().pushCritical(TITLE, str(err))
            return None

        def job(progress, should_stop):
            return backend.enhance(options, progress, should_stop)

        task = GeosrTask(f"geosr: enhance {Path(options.input).name} x{options.scale or ''}", job, self._enhance_done)
        task.options = options
        task.backend = backend
        self.tasks.append(task)
        QgsApplication.taskManager().addTask(task)
        return task

    def _enhance_done(self, task: GeosrTask) -> None:
        if task in self.tasks:
            self.tasks.remove(task)
        bar = self.iface.messageBar()
        if task.error is not None:
            bar.pushCritical(TITLE, task.error)
        elif task.cancelled:
            bar.pushInfo(TITLE, "cancelled; no output was written")
        else:
            path = str(task.result)
            layer = QgsRasterLayer(path, Path(path).stem)
            if not layer.isValid():
                bar.pushCritical(TITLE, f"{path}: written, but QGIS cannot open it")
                return
            QgsProject.instance().addMapLayer(layer)
            task.layer = layer
            bar.pushSuccess(TITLE, f"wrote {path}")

    # -- settings ---------------------------------------------------------------------------------------------
    def show_settings(self):
        SettingsDialog(self.iface.mainWindow()).exec_()


class SettingsDialog(QDialog):
    """Backend (auto / in-process / subprocess), the interpreter that has geosr, extra PYTHONPATH; a Test button."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWindowTitle("geosr settings")
        form = QFormLayout(self)
        self.backend = QComboBox()
        self.backend.addItems(BACKENDS)
        self.backend.setCurrentText(settings.backend_mode())
        form.addRow("Backend", self.backend)
        self.interpreter = QgsFileWidget()
        self.interpreter.setFilePath(settings.interpreter())
        form.addRow("Python with geosr installed", self.interpreter)
        self.pythonpath = QLineEdit(settings.pythonpath())
        form.addRow("Extra PYTHONPATH (optional)", self.pythonpath)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        test = QPushButton("Test")
        test.clicked.connect(self.test)
        form.addRow(test, self.status)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.save)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def test(self):
        try:
            backend = choose_backend(self.backend.currentText(), self.interpreter.filePath(), self.pythonpath.text())
            self.status.setText(f"{backend.name}: {backend.version()}")
        except RunError as err:
            self.status.setText(str(err))

    def save(self):
        settings.set_value("backend", self.backend.currentText())
        settings.set_value("interpreter", self.interpreter.filePath().strip())
        settings.set_value("pythonpath", self.pythonpath.text().strip())
        self.accept()
