"""Checks of the geosr QGIS plugin inside a real, headless QGIS application.

Run with QGIS's Python (Debian: /usr/bin/python3), not the project's venv; tests/test_qgis_plugin.py does that:

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_checks.py CHECK --fixture F --scene S \
        --interpreter .venv/bin/python --pythonpath . --workdir DIR

CHECK is one of processing, task, cancel, backend, zip (the built plugin zip, installed and started the way QGIS
does). Exits 0 when every assertion holds, else prints the failed
one and exits 1. The plugin's backend is set to ``subprocess`` with the given interpreter (geosr does not import
in QGIS's Python).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
REPO = Path(__file__).resolve().parent.parent
if "zip" not in sys.argv[1:2]:  # the zip check imports the plugin from the extracted zip only
    sys.path.insert(0, str(REPO / "qgis_plugin"))

from qgis.core import (Qgis, QgsApplication, QgsProcessingFeedback, QgsProject, QgsRasterLayer,  # noqa: E402
                       QgsTask)

APP = QgsApplication([], True)  # GUI enabled (offscreen): the dialog and the message bar are real widgets
APP.initQgis()
sys.path.append("/usr/share/qgis/python/plugins")

import processing  # noqa: E402
from processing.core.Processing import Processing  # noqa: E402
from qgis.gui import QgsMessageBar  # noqa: E402
from qgis.PyQt.QtWidgets import QDialog, QMainWindow  # noqa: E402

Processing.initialize()


class FakeIface:
    """The part of QgisInterface the plugin uses, with a real main window and message bar."""

    def __init__(self):
        self.window = QMainWindow()
        self.bar = QgsMessageBar()
        self.toolbar: list = []
        self.menu: list = []
        self.active = None

    def mainWindow(self):  # noqa: N802
        return self.window

    def messageBar(self):  # noqa: N802
        return self.bar

    def activeLayer(self):  # noqa: N802
        return self.active

    def addToolBarIcon(self, action):  # noqa: N802
        self.toolbar.append(action)

    def removeToolBarIcon(self, action):  # noqa: N802
        self.toolbar.remove(action)

    def addPluginToRasterMenu(self, menu, action):  # noqa: N802
        self.menu.append(action)

    def removePluginRasterMenu(self, menu, action):  # noqa: N802
        self.menu.remove(action)

    def messages(self):
        return [(item.level(), item.text()) for item in self.bar.items()]


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def close(a, b, tol=1e-6):
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def assert_enhanced(path, src: QgsRasterLayer, scale: int) -> QgsRasterLayer:
    out = QgsRasterLayer(str(path), "out")
    check(out.isValid(), f"{path}: QGIS cannot open the output")
    check(out.crs() == src.crs(), f"CRS {out.crs().authid()} != input {src.crs().authid()}")
    e, s = out.extent(), src.extent()
    for name in ("xMinimum", "xMaximum", "yMinimum", "yMaximum"):
        check(close(getattr(e, name)(), getattr(s, name)()), f"extent {name} {getattr(e, name)()} != "
                                                             f"{getattr(s, name)()}")
    check(close(out.rasterUnitsPerPixelX(), src.rasterUnitsPerPixelX() / scale),
          f"pixel width {out.rasterUnitsPerPixelX()} != {src.rasterUnitsPerPixelX()} / {scale}")
    check(close(out.rasterUnitsPerPixelY(), src.rasterUnitsPerPixelY() / scale),
          f"pixel height {out.rasterUnitsPerPixelY()} != {src.rasterUnitsPerPixelY()} / {scale}")
    check((out.width(), out.height()) == (src.width() * scale, src.height() * scale),
          f"size {out.width()}x{out.height()} != {scale} x {src.width()}x{src.height()}")
    check(out.bandCount() == src.bandCount(), f"{out.bandCount()} bands != {src.bandCount()}")
    return out


def configure(args):
    from geosr_qgis import settings

    settings.set_value("backend", "subprocess")
    settings.set_value("interpreter", args.interpreter)
    settings.set_value("pythonpath", args.pythonpath or "")


def wait_until(predicate, timeout, what):
    t0 = time.monotonic()
    while not predicate():
        APP.processEvents()
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


class RecordingFeedback(QgsProcessingFeedback):
    def __init__(self, cancel_at: float | None = None):
        super().__init__()
        self.values: list[float] = []
        self.cancel_at = cancel_at
        self.progressChanged.connect(self._record)

    def _record(self, value):
        self.values.append(value)
        if self.cancel_at is not None and value >= self.cancel_at:
            self.cancel()


# ---------------------------------------------------------------------------------------------------------------


def check_processing(args):
    configure(args)
    registry = QgsApplication.processingRegistry()
    from geosr_qgis.provider import GeosrProvider

    provider = GeosrProvider()
    check(registry.addProvider(provider), "the geosr provider did not register")
    try:
        _processing_runs(args, provider)
    finally:
        registry.removeProvider(provider)  # as the plugin's unload does; QGIS crashes at exit otherwise


def _processing_runs(args, provider):
    ids = {alg.id() for alg in provider.algorithms()}
    check(ids == {"geosr:enhance", "geosr:modalities", "geosr:score"}, f"algorithms {sorted(ids)}")
    src = QgsRasterLayer(args.fixture, "fixture")
    check(src.isValid(), f"{args.fixture}: not readable")
    work = Path(args.workdir)
    out = work / "processing_x4.tif"
    feedback = RecordingFeedback()
    result = processing.run("geosr:enhance", {"INPUT": args.fixture, "MODEL": "lanczos", "SCALE": 4, "TILE": 64,
                                              "OUTPUT": str(out)}, feedback=feedback)
    check(Path(result["OUTPUT"]) == out, f"OUTPUT {result['OUTPUT']} != {out}")
    assert_enhanced(out, src, 4)
    check(feedback.values and max(feedback.values) == 100.0, f"progress never reached 100: {feedback.values}")
    check(any(0 < v < 100 for v in feedback.values), f"no intermediate progress: {feedback.values}")
    print("ok enhance via processing.run: CRS, extent, pixel size, size;", len(feedback.values), "progress updates")

    # a temporary output, as the toolbox and graphical models use by default; scale 2 this time
    result = processing.run("geosr:enhance", {"INPUT": src, "MODEL": "bicubic", "SCALE": 2,
                                              "OUTPUT": "TEMPORARY_OUTPUT"})
    check(str(result["OUTPUT"]).endswith(".tif"), f"temporary output {result['OUTPUT']} is not a GeoTIFF name")
    assert_enhanced(result["OUTPUT"], src, 2)
    print("ok enhance to TEMPORARY_OUTPUT, x2")

    # errors: geosr's one line, as a Processing error
    try:
        processing.run("geosr:enhance", {"INPUT": args.fixture, "MODEL": "rrdn-gan", "SCALE": 3,
                                         "OUTPUT": str(work / "bad.tif")})
    except Exception as err:  # QgsProcessingException
        text = str(err)
        check("Traceback" not in text and "scale" in text.lower(), f"unexpected error text: {text!r}")
        print("ok a refused scale is one line:", text)
    else:
        raise AssertionError("scale 3 with rrdn-gan did not fail")
    check(not (work / "bad.tif").exists(), "a failed run left an output")

    # in a graphical model: a scene parameter feeding geosr:enhance, its OUTPUT the model's output
    from qgis.core import (QgsProcessingModelAlgorithm, QgsProcessingModelChildAlgorithm,
                           QgsProcessingModelChildParameterSource, QgsProcessingModelOutput,
                           QgsProcessingModelParameter, QgsProcessingParameterRasterLayer)

    model = QgsProcessingModelAlgorithm("geosr in a model", "tests")
    model.addModelParameter(QgsProcessingParameterRasterLayer("scene", "Scene"), QgsProcessingModelParameter("scene"))
    child = QgsProcessingModelChildAlgorithm("geosr:enhance")
    child.setChildId("enhance")
    child.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("scene")])
    child.addParameterSources("MODEL", [QgsProcessingModelChildParameterSource.fromStaticValue("nearest")])
    child.addParameterSources("SCALE", [QgsProcessingModelChildParameterSource.fromStaticValue(2)])
    model_out = QgsProcessingModelOutput("enhanced")
    model_out.setChildId("enhance")
    model_out.setChildOutputName("OUTPUT")
    child.setModelOutputs({"enhanced": model_out})
    model.addChildAlgorithm(child)
    ok, problems = model.validate()
    check(ok, f"model does not validate: {problems}")
    out_model = work / "model_x2.tif"
    result = processing.run(model, {"scene": args.fixture, "enhance:enhanced": str(out_model)})
    check(Path(result["enhance:enhanced"]) == out_model, f"model outputs {result}")
    assert_enhanced(out_model, src, 2)
    print("ok enhance inside a graphical model")

    mods = processing.run("geosr:modalities", {"INPUT": args.fixture, "OUTPUT": str(work / "modalities")})
    edges = QgsRasterLayer(mods["EDGES"], "edges")
    check(edges.isValid() and edges.crs() == src.crs() and edges.extent() == src.extent(),
          f"edges.tif: {mods['EDGES']} not on the scene's grid")
    check(isinstance(mods["CAPTION"], str) and mods["CAPTION"], "no caption")
    print("ok modalities:", sorted(p.name for p in Path(mods["OUTPUT"]).iterdir()))

    score = processing.run("geosr:score", {"SR": str(out), "LR": args.fixture, "LPIPS": False,
                                           "JSON": str(work / "score.json")})
    check(Path(score["JSON"]).is_file(), "no JSON report")
    lrc = score["LR_CONSISTENCY_DB"]
    check(isinstance(lrc, float) and 20 < lrc < 100, f"LR-consistency {lrc!r} dB")
    check(score["PSNR_Y"] is None, "PSNR-Y without a reference")
    print(f"ok score: LR-consistency {lrc:.2f} dB")


def _plugin(args):
    from geosr_qgis.plugin import GeosrPlugin

    iface = FakeIface()
    plugin = GeosrPlugin(iface)
    plugin.initGui()
    return iface, plugin


def check_task(args):
    from geosr_qgis.dialog import EnhanceDialog

    configure(args)
    iface, plugin = _plugin(args)
    texts = [a.text() for a in iface.toolbar]
    check(texts == ["Enhance with geosr"], f"toolbar {texts}")
    plugin.run()  # no active layer: a warning, no dialog
    check(iface.messages() and iface.messages()[0][0] == Qgis.Warning, f"messages {iface.messages()}")
    iface.bar.clearWidgets()

    src = QgsRasterLayer(args.fixture, "fixture")
    QgsProject.instance().addMapLayer(src)
    iface.active = src
    dialog = EnhanceDialog(src)
    check(dialog.layer.currentLayer() is src, "the dialog does not start on the active layer")
    check(dialog.output.filePath().endswith("_x4.tif"), f"suggested output {dialog.output.filePath()}")
    check(not dialog.mmsr.isEnabled(), "mmsr settings enabled for the default model")
    dialog.model.setCurrentText("mmsr")
    check(dialog.mmsr.isEnabled(), "mmsr settings disabled for mmsr")
    dialog.modalities["depth"].setChecked(False)
    dialog.temperatures["edges"].setValue(2.0)
    dialog.guidance.setValue(3.0)
    opts = dialog.options()
    check((opts.drop, opts.temperatures, opts.guidance) == ("depth", "edges=2", 3.0),
          f"mmsr options {opts.drop!r} {opts.temperatures!r} {opts.guidance!r}")
    out = Path(args.workdir) / "task_x4.tif"

    import geosr_qgis.plugin as plugin_module

    class AcceptedDialog(EnhanceDialog):  # the user picks lanczos, 48 px tiles and an output, then OK
        def exec_(self):
            self.model.setCurrentText("lanczos")
            self.tile.setValue(48)  # several tiles, so progress has steps
            self.output.setFilePath(str(out))
            return QDialog.Accepted

    plugin_module.EnhanceDialog = AcceptedDialog
    progress = []
    iface.toolbar[0].trigger()  # the button
    check(len(plugin.tasks) == 1, f"the button started {len(plugin.tasks)} tasks; messages {iface.messages()}")
    task = plugin.tasks[0]
    opts = task.options
    check((opts.model, opts.scale, opts.tile, opts.drop, opts.input) == ("lanczos", 4, 48, None, args.fixture),
          f"options {opts}")
    task.progressChanged.connect(progress.append)
    seconds = wait_until(lambda: task not in plugin.tasks, 300, "the enhance task")
    check(task.status() == QgsTask.Complete, f"task status {task.status()}, error {task.error}")
    layers = [lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.source() == str(out)]
    check(len(layers) == 1, f"output layer not added to the project: {list(QgsProject.instance().mapLayers())}")
    assert_enhanced(layers[0].source(), src, 4)
    check(progress and max(progress) == 100.0 and any(0 < v < 100 for v in progress), f"task progress {progress}")
    check(any(lvl == Qgis.Success and str(out) in text for lvl, text in iface.messages()),
          f"messages {iface.messages()}")
    print(f"ok button's task: layer added with the input's CRS and extent, pixel size / 4, {seconds:.1f} s, "
          f"progress {progress[:3]}...{progress[-1:]}")

    # an error reaches the message bar as one line, no traceback, nothing added
    iface.bar.clearWidgets()
    n_layers = len(QgsProject.instance().mapLayers())
    opts.output = str(Path(args.workdir) / "missing-folder" / "x.tif")
    task = plugin.start_enhance(opts)
    wait_until(lambda: task not in plugin.tasks, 120, "the failing task")
    msgs = iface.messages()
    check(len(msgs) == 1 and msgs[0][0] == Qgis.Critical, f"messages {msgs}")
    check("does not exist" in msgs[0][1] and "Traceback" not in msgs[0][1] and "\n" not in msgs[0][1],
          f"error text {msgs[0][1]!r}")
    check(len(QgsProject.instance().mapLayers()) == n_layers, "a layer was added after an error")
    print("ok error in the message bar:", msgs[0][1])
    plugin.unload()
    check(iface.toolbar == [] and iface.menu == [], "unload left actions behind")


def check_cancel(args):
    from geosr_qgis.options import EnhanceOptions, partial_outputs

    configure(args)
    iface, plugin = _plugin(args)
    out = Path(args.workdir) / "cancelled_x4.tif"
    # many small tiles on the 875x600 scene: about a minute of work, cancelled after the first tiles
    opts = EnhanceOptions(input=args.scene, output=str(out), model="lanczos", scale=4, tile=32, overlap=8)
    task = plugin.start_enhance(opts)
    wait_until(lambda: task.progress() > 0 or task not in plugin.tasks, 120, "the first tiles")
    check(task in plugin.tasks, f"the task ended before it could be cancelled: {task.error}")
    seen = task.progress()
    wait_until(lambda: partial_outputs(out), 30, "the partial output file")  # it really was writing
    proc = task.backend.process
    t0 = time.monotonic()
    task.cancel()
    wait_until(lambda: task not in plugin.tasks, 60, "the cancelled task to finish")
    took = time.monotonic() - t0
    check(task.cancelled and task.error is None, f"cancelled={task.cancelled}, error={task.error}")
    check(proc.returncode == 130, f"geosr exit status {proc.returncode} after {took:.1f} s: it did not stop on "
                                  "SIGTERM like Ctrl-C (130), it was killed")
    check(task.status() == QgsTask.Terminated, f"task status {task.status()}")
    check(task.progress() < 100, f"progress {task.progress()} after Cancel")
    check(proc is not None and proc.poll() is not None, "the geosr subprocess is still running")
    check(not Path(f"/proc/{proc.pid}").exists(), f"process {proc.pid} still exists")
    check(not out.exists(), f"{out} exists after Cancel")
    leftovers = partial_outputs(out)
    check(not leftovers, f"partial files left: {leftovers}")
    check(not any(lvl == Qgis.Critical for lvl, _ in iface.messages()), f"messages {iface.messages()}")
    print(f"ok cancel at {seen:.1f} %: stopped {took:.1f} s after Cancel, subprocess {proc.pid} gone "
          f"(exit {proc.returncode}), no output, no partial file")

    # Cancel from Processing (the toolbox's Cancel button is feedback.cancel())
    out2 = Path(args.workdir) / "cancelled_processing_x4.tif"
    feedback = RecordingFeedback(cancel_at=0.5)
    try:
        processing.run("geosr:enhance", {"INPUT": args.scene, "MODEL": "lanczos", "SCALE": 4, "TILE": 32,
                                         "OVERLAP": 8, "OUTPUT": str(out2)}, feedback=feedback)
    except Exception as err:
        check("cancelled" in str(err), f"unexpected error {err!r}")
    else:
        raise AssertionError("a cancelled Processing run returned normally")
    check(max(feedback.values) < 100, f"progress {max(feedback.values)} after Cancel")
    check(not out2.exists() and not partial_outputs(out2), "a cancelled Processing run left files")
    print(f"ok cancel in Processing at {max(feedback.values):.1f} %: no output, no partial file")
    plugin.unload()


def check_backend(args):
    from geosr_qgis import settings
    from geosr_qgis.backend import InProcessBackend, SubprocessBackend, in_process_safe

    configure(args)
    settings.set_value("backend", "auto")
    backend = settings.configured_backend()
    importable = in_process_safe()
    check(isinstance(backend, InProcessBackend if importable else SubprocessBackend), f"auto chose {backend}")
    if isinstance(backend, SubprocessBackend):
        check(backend.interpreter == args.interpreter, f"interpreter {backend.interpreter}")
        version = backend.version()
        check(version.startswith("geosr "), f"--version said {version!r}")
    print(f"ok auto backend in QGIS's Python ({sys.executable}): geosr safely importable={importable} -> "
          f"{backend.name}, {backend.version()}")
    from geosr_qgis.plugin import SettingsDialog

    dialog = SettingsDialog()  # what the user sees: the stored values, Test, OK stores the edits
    check((dialog.backend.currentText(), dialog.interpreter.filePath()) == ("auto", args.interpreter),
          "the settings dialog does not show the stored settings")
    dialog.backend.setCurrentText("subprocess")
    dialog.test()
    check(dialog.status.text().startswith("subprocess: geosr "), f"Test says {dialog.status.text()!r}")
    dialog.save()
    check(settings.backend_mode() == "subprocess", f"backend stored as {settings.backend_mode()!r}")
    print("ok settings dialog:", dialog.status.text())

    settings.set_value("interpreter", "/nonexistent/python")
    try:
        settings.configured_backend().version()
    except Exception as err:
        check("cannot run /nonexistent/python" in str(err), f"unexpected {err!r}")
    else:
        raise AssertionError("a missing interpreter did not fail")
    print("ok a missing interpreter is one line")


def check_zip(args):
    """Install the zip as QGIS does (extract into a plugins folder), load and start it, run Processing enhance."""
    import zipfile

    import qgis.utils

    plugins = Path(args.workdir) / "profile" / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(args.zip) as zf:
        zf.extractall(plugins)
    sys.path.insert(0, str(plugins))
    qgis.utils.plugin_paths.insert(0, str(plugins))
    qgis.utils.updateAvailablePlugins()  # what QGIS does at startup: scan the plugin folders
    check("geosr_qgis" in qgis.utils.available_plugins, f"QGIS does not see the plugin: {qgis.utils.available_plugins}")
    for key, want in (("name", "geosr"), ("qgisMinimumVersion", "3.22"), ("hasProcessingProvider", "yes")):
        got = qgis.utils.pluginMetadata("geosr_qgis", key)
        check(got == want, f"QGIS reads metadata {key}={got!r}, not {want!r}")
    iface = FakeIface()
    qgis.utils.iface = iface
    check(qgis.utils.loadPlugin("geosr_qgis"), "QGIS could not load geosr_qgis from the zip")
    check(qgis.utils.startPlugin("geosr_qgis"), "QGIS could not start geosr_qgis")
    import geosr_qgis

    check(Path(geosr_qgis.__file__).resolve().parent == (plugins / "geosr_qgis").resolve(),
          f"geosr_qgis imported from {geosr_qgis.__file__}, not the zip")
    check([a.text() for a in iface.toolbar] == ["Enhance with geosr"], "no toolbar button")
    check(QgsApplication.processingRegistry().algorithmById("geosr:enhance") is not None, "no geosr:enhance")
    configure(args)
    src = QgsRasterLayer(args.fixture, "fixture")
    out = Path(args.workdir) / "zip_x2.tif"
    processing.run("geosr:enhance", {"INPUT": args.fixture, "MODEL": "nearest", "SCALE": 2, "OUTPUT": str(out)})
    assert_enhanced(out, src, 2)
    qgis.utils.showException = lambda *a, **k: traceback.print_exception(a[0], a[1], a[2])  # not a dialog
    check(qgis.utils.unloadPlugin("geosr_qgis"), "QGIS could not unload geosr_qgis")
    check(QgsApplication.processingRegistry().algorithmById("geosr:enhance") is None, "provider left registered")
    print(f"ok the zip installs, starts (button, provider), enhances and unloads: {args.zip}")


CHECKS = {"zip": check_zip, "processing": check_processing, "task": check_task, "cancel": check_cancel,
          "backend": check_backend}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("check", choices=sorted(CHECKS))
    p.add_argument("--fixture", required=True)
    p.add_argument("--scene", required=True, help="a larger raster, for the Cancel check")
    p.add_argument("--interpreter", required=True, help="Python with geosr (the project's .venv/bin/python)")
    p.add_argument("--pythonpath", default="")
    p.add_argument("--workdir", required=True)
    p.add_argument("--zip", default=None, help="the plugin zip (zip check)")
    args = p.parse_args()
    try:
        CHECKS[args.check](args)
    except AssertionError as err:
        print(f"FAILED {args.check}: {err}", file=sys.stderr)
        return 1
    except Exception:
        print(f"FAILED {args.check} with an exception:\n{traceback.format_exc()}", file=sys.stderr)
        return 1
    finally:
        QgsProject.instance().clear()
    return 0


if __name__ == "__main__":
    code = main()
    gc.collect()  # QGIS objects made in the checks go before QGIS does
    APP.exitQgis()
    sys.stdout.flush()
    sys.stderr.flush()
    # QGIS 3.22 standalone can segfault in Python's own teardown, after exitQgis (seen here after the processing
    # check, with every check passed, no Python frame on the stack): the verdict is known, so skip the teardown.
    os._exit(code)
