"""The "Enhance with geosr" dialog, built in code (no .ui compile step)."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsMapLayerProxyModel, QgsRasterLayer
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFormLayout,
                                 QGroupBox, QHBoxLayout, QSpinBox, QVBoxLayout, QWidget)

from .options import GEODATA_MODELS, GUIDANCE_MODES, MODALITIES, MODELS, EnhanceOptions, layer_file


def default_output(source: str, scale: int) -> str:
    src = Path(source.split("|", 1)[0])
    return str(src.with_name(f"{src.stem}_x{scale}.tif"))


class EnhanceDialog(QDialog):
    def __init__(self, layer: QgsRasterLayer | None = None, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Enhance with geosr")
        form = QFormLayout()

        self.layer = QgsMapLayerComboBox()
        self.layer.setFilters(QgsMapLayerProxyModel.RasterLayer)
        if layer is not None:
            self.layer.setLayer(layer)
        form.addRow("Raster layer", self.layer)
        self.model = QComboBox()
        self.model.addItems(MODELS)
        form.addRow("Model", self.model)
        self.scale = QSpinBox()
        self.scale.setRange(1, 16)
        self.scale.setValue(4)
        form.addRow("Scale", self.scale)
        self.tile = QSpinBox()
        self.tile.setRange(0, 8192)
        self.tile.setSpecialValueText("the model's")
        self.tile.setToolTip("tile size in input px: smaller tiles need less memory")
        form.addRow("Tile size", self.tile)
        self.output = QgsFileWidget()
        self.output.setStorageMode(QgsFileWidget.SaveFile)
        self.output.setFilter("GeoTIFF (*.tif *.tiff)")
        form.addRow("Output GeoTIFF", self.output)
        self.overwrite = QCheckBox("Replace an existing output")
        form.addRow("", self.overwrite)

        self.mmsr = QGroupBox("Diffusion model (mmsr): conditions and guidance")
        mform = QFormLayout(self.mmsr)
        self.checkpoint = QgsFileWidget()
        self.checkpoint.setStorageMode(QgsFileWidget.GetDirectory)
        mform.addRow("Checkpoint (empty: embedded)", self.checkpoint)
        row = QWidget()
        rlay = QHBoxLayout(row)
        rlay.setContentsMargins(0, 0, 0, 0)
        self.modalities: dict[str, QCheckBox] = {}
        self.temperatures: dict[str, QDoubleSpinBox] = {}
        for name in MODALITIES:
            box = QCheckBox(name)
            box.setChecked(True)
            self.modalities[name] = box
            rlay.addWidget(box)
        mform.addRow("Modalities used", row)
        trow = QWidget()
        tlay = QHBoxLayout(trow)
        tlay.setContentsMargins(0, 0, 0, 0)
        for name in MODALITIES:
            spin = QDoubleSpinBox()
            spin.setRange(0.05, 20.0)
            spin.setSingleStep(0.1)
            spin.setValue(1.0)
            spin.setPrefix(f"{name} ")
            spin.setToolTip("attention temperature: below 1 the model listens to this modality more, above 1 less")
            self.temperatures[name] = spin
            tlay.addWidget(spin)
        mform.addRow("Temperatures", trow)
        self.dsm = self._layer_choice(QgsMapLayerProxyModel.RasterLayer)
        mform.addRow("DSM (optional)", self.dsm)
        self.landcover = self._layer_choice(QgsMapLayerProxyModel.RasterLayer)
        mform.addRow("Land cover (optional)", self.landcover)
        self.vectors = self._layer_choice(QgsMapLayerProxyModel.VectorLayer)
        mform.addRow("Vectors (optional)", self.vectors)
        self.guidance = QDoubleSpinBox()
        self.guidance.setRange(0.0, 50.0)
        self.guidance.setSingleStep(0.5)
        mform.addRow("Guidance w", self.guidance)
        self.guidance_mode = QComboBox()
        self.guidance_mode.addItems(GUIDANCE_MODES)
        mform.addRow("Guidance mode", self.guidance_mode)
        self.steps = QSpinBox()
        self.steps.setRange(0, 1000)
        self.steps.setSpecialValueText("checkpoint's")  # 0: the checkpoint's recommendation (else 4)
        self.steps.setValue(0)
        mform.addRow("Steps", self.steps)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        mform.addRow("Seed", self.seed)

        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        outer = QVBoxLayout(self)
        outer.addLayout(form)
        outer.addWidget(self.mmsr)
        outer.addWidget(buttons)

        self.model.currentTextChanged.connect(self._model_changed)
        self.scale.valueChanged.connect(self._suggest_output)
        self.layer.layerChanged.connect(self._suggest_output)
        self._model_changed(self.model.currentText())
        self._suggest_output()

    @staticmethod
    def _layer_choice(filters) -> QgsMapLayerComboBox:
        box = QgsMapLayerComboBox()
        box.setFilters(filters)
        box.setAllowEmptyLayer(True)
        box.setLayer(None)
        return box

    def _model_changed(self, name: str) -> None:
        self.mmsr.setEnabled(name in GEODATA_MODELS)

    def _suggest_output(self, *_):
        layer = self.layer.currentLayer()
        current = self.output.filePath()
        if layer is not None and (not current or current == getattr(self, "_suggested", None)):
            self._suggested = default_output(layer.source(), self.scale.value())
            self.output.setFilePath(self._suggested)

    def options(self) -> EnhanceOptions:
        """What the dialog says, as geosr options; ValueError (one line) when something is missing or not a file."""
        layer = self.layer.currentLayer()
        if layer is None:
            raise ValueError("choose a raster layer to enhance")
        output = self.output.filePath().strip()
        if not output:
            raise ValueError("choose an output GeoTIFF")
        opts = EnhanceOptions(input=layer_file(layer.source()), output=output, model=self.model.currentText(),
                              scale=self.scale.value(), tile=self.tile.value() or None,
                              overwrite=self.overwrite.isChecked())
        if opts.model in GEODATA_MODELS:
            opts.checkpoint = self.checkpoint.filePath().strip() or None
            opts.modalities = tuple(n for n, box in self.modalities.items() if box.isChecked())
            temps = [f"{n}={s.value():g}" for n, s in self.temperatures.items() if abs(s.value() - 1.0) > 1e-9]
            opts.temperatures = ",".join(temps) or None
            for name in ("dsm", "landcover", "vectors"):
                chosen = getattr(self, name).currentLayer()
                setattr(opts, name, layer_file(chosen.source()) if chosen is not None else None)
            opts.guidance = self.guidance.value() or None
            opts.guidance_mode = self.guidance_mode.currentText()
            opts.steps = self.steps.value() or None
            opts.seed = self.seed.value()
        return opts
