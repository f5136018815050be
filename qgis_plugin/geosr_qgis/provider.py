"""The Processing provider: geosr:enhance, geosr:modalities and geosr:score, for the toolbox, graphical models
and ``processing.run``. Each algorithm fills an options dataclass and hands it to the configured backend."""

from __future__ import annotations

import json
from pathlib import Path

from qgis.core import (QgsProcessing, QgsProcessingAlgorithm, QgsProcessingException, QgsProcessingOutputNumber,
                       QgsProcessingOutputRasterLayer, QgsProcessingOutputString, QgsProcessingParameterBoolean,
                       QgsProcessingParameterEnum, QgsProcessingParameterFile, QgsProcessingParameterFileDestination,
                       QgsProcessingParameterFolderDestination, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterDestination, QgsProcessingParameterRasterLayer,
                       QgsProcessingParameterString, QgsProcessingParameterVectorLayer, QgsProcessingProvider)
from qgis.PyQt.QtGui import QIcon

from . import settings
from .backend import RunCancelled, RunError
from .options import GUIDANCE_MODES, MODALITIES, MODELS, EnhanceOptions, ModalitiesOptions, ScoreOptions, layer_file

ICON = Path(__file__).with_name("icon.svg")


class GeosrProvider(QgsProcessingProvider):
    def id(self):
        return "geosr"

    def name(self):
        return "geosr"

    def icon(self):
        return QIcon(str(ICON))

    def supportedOutputRasterLayerExtensions(self):  # noqa: N802 (geosr writes GeoTIFF only)
        return ["tif"]

    def loadAlgorithms(self):
        for alg in (EnhanceAlgorithm(), ModalitiesAlgorithm(), ScoreAlgorithm()):
            self.addAlgorithm(alg)


class _GeosrAlgorithm(QgsProcessingAlgorithm):
    def createInstance(self):
        return type(self)()

    def icon(self):
        return QIcon(str(ICON))

    def _file(self, parameters, name, context) -> str | None:
        layer = (self.parameterAsRasterLayer(parameters, name, context)
                 if isinstance(self.parameterDefinition(name), QgsProcessingParameterRasterLayer)
                 else self.parameterAsVectorLayer(parameters, name, context))
        if layer is None:
            return None
        try:
            return layer_file(layer.source())
        except ValueError as err:
            raise QgsProcessingException(f"{name}: {err}") from err

    @staticmethod
    def _optional_int(parameters, name) -> int | None:
        value = parameters.get(name)
        return None if value in (None, "") else int(value)

    def _run(self, method: str, opts, feedback):
        def progress(done, total, message):
            if total > 0:
                feedback.setProgress(100.0 * done / total)
            if message:
                feedback.setProgressText(message)

        try:
            backend = settings.configured_backend()
            feedback.pushInfo(f"geosr backend: {backend.name}")
            return getattr(backend, method)(opts, progress, feedback.isCanceled)
        except RunCancelled:
            raise QgsProcessingException("cancelled; no output was written") from None
        except (RunError, ValueError) as err:
            raise QgsProcessingException(str(err)) from None


class EnhanceAlgorithm(_GeosrAlgorithm):
    def name(self):
        return "enhance"

    def displayName(self):
        return "Enhance raster (super-resolution)"

    def shortHelpString(self):
        return ("Super-resolves a GeoTIFF with geosr, tile by tile on the CPU. The output keeps the input's CRS and "
                "extent; its pixels are SCALE times smaller. DSM, land cover, vectors, modalities, temperatures and "
                "guidance apply to the diffusion model (mmsr) only.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Input raster"))
        model = QgsProcessingParameterEnum("MODEL", "Model", options=list(MODELS), defaultValue="rrdn-gan")
        model.setUsesStaticStrings(True)
        self.addParameter(model)
        self.addParameter(QgsProcessingParameterNumber("SCALE", "Scale", QgsProcessingParameterNumber.Integer,
                                                       defaultValue=4, minValue=1, maxValue=16))
        for name, label in (("TILE", "Tile size (input px; empty: the model's)"),
                            ("OVERLAP", "Tile overlap (input px; empty: from the receptive field)")):
            self.addParameter(QgsProcessingParameterNumber(name, label, QgsProcessingParameterNumber.Integer,
                                                           optional=True, minValue=0))
        self.addParameter(QgsProcessingParameterFile("CHECKPOINT", "mmsr checkpoint folder (empty: embedded)",
                                                     behavior=QgsProcessingParameterFile.Folder, optional=True))
        mods = QgsProcessingParameterEnum("MODALITIES", "mmsr modalities used (empty: all)", options=list(MODALITIES),
                                          allowMultiple=True, optional=True)
        mods.setUsesStaticStrings(True)
        self.addParameter(mods)
        self.addParameter(QgsProcessingParameterRasterLayer("DSM", "mmsr: DSM", optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer("LANDCOVER", "mmsr: land cover (with class table)",
                                                            optional=True))
        self.addParameter(QgsProcessingParameterVectorLayer("VECTORS", "mmsr: roads / buildings / water",
                                                            [QgsProcessing.TypeVectorAnyGeometry], optional=True))
        self.addParameter(QgsProcessingParameterString("TEMPERATURES", "mmsr: temperatures, e.g. depth=0.5,edges=2",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterNumber("GUIDANCE", "mmsr: guidance w",
                                                       QgsProcessingParameterNumber.Double, optional=True, minValue=0))
        gmode = QgsProcessingParameterEnum("GUIDANCE_MODE", "mmsr: guidance mode", options=list(GUIDANCE_MODES),
                                           optional=True)
        gmode.setUsesStaticStrings(True)
        self.addParameter(gmode)
        self.addParameter(QgsProcessingParameterNumber("STEPS", "mmsr: denoising steps",
                                                       QgsProcessingParameterNumber.Integer, optional=True, minValue=1))
        self.addParameter(QgsProcessingParameterNumber("SEED", "mmsr: seed", QgsProcessingParameterNumber.Integer,
                                                       optional=True, minValue=0))
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT", "Enhanced raster"))

    def processAlgorithm(self, parameters, context, feedback):
        modalities = [m for m in self.parameterAsEnumStrings(parameters, "MODALITIES", context) if m]
        guidance = parameters.get("GUIDANCE")
        opts = EnhanceOptions(
            input=self._file(parameters, "INPUT", context),
            output=self.parameterAsOutputLayer(parameters, "OUTPUT", context),
            model=self.parameterAsEnumString(parameters, "MODEL", context) or None,
            scale=self.parameterAsInt(parameters, "SCALE", context),
            tile=self._optional_int(parameters, "TILE"), overlap=self._optional_int(parameters, "OVERLAP"),
            checkpoint=self.parameterAsFile(parameters, "CHECKPOINT", context) or None,
            modalities=tuple(modalities) if modalities else None,
            dsm=self._file(parameters, "DSM", context), landcover=self._file(parameters, "LANDCOVER", context),
            vectors=self._file(parameters, "VECTORS", context),
            temperatures=self.parameterAsString(parameters, "TEMPERATURES", context) or None,
            guidance=None if guidance in (None, "") else float(guidance),
            guidance_mode=self.parameterAsEnumString(parameters, "GUIDANCE_MODE", context) or None,
            steps=self._optional_int(parameters, "STEPS"), seed=self._optional_int(parameters, "SEED"),
            overwrite=True,  # Processing has already asked about replacing the destination
        )
        if opts.input is None:
            raise QgsProcessingException("INPUT: choose a raster layer")
        return {"OUTPUT": self._run("enhance", opts, feedback)}


class ModalitiesAlgorithm(_GeosrAlgorithm):
    def name(self):
        return "modalities"

    def displayName(self):
        return "Conditions of a scene (modalities)"

    def shortHelpString(self):
        return ("Writes what the diffusion model is conditioned on, each on the scene's grid: edges.tif, "
                "segmentation.tif, height.tif (with a DSM), vectors.tif (with vectors) and caption.json.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Input raster"))
        self.addParameter(QgsProcessingParameterRasterLayer("DSM", "DSM", optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer("LANDCOVER", "Land cover (with class table)",
                                                            optional=True))
        self.addParameter(QgsProcessingParameterVectorLayer("VECTORS", "Roads / buildings / water",
                                                            [QgsProcessing.TypeVectorAnyGeometry], optional=True))
        self.addParameter(QgsProcessingParameterNumber("TILE", "Tile side (px; empty: 512)",
                                                       QgsProcessingParameterNumber.Integer, optional=True,
                                                       minValue=16))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", "Output folder"))
        self.addOutput(QgsProcessingOutputRasterLayer("EDGES", "Edges"))
        self.addOutput(QgsProcessingOutputRasterLayer("SEGMENTATION", "Segmentation"))
        self.addOutput(QgsProcessingOutputString("CAPTION", "Caption"))

    def processAlgorithm(self, parameters, context, feedback):
        opts = ModalitiesOptions(input=self._file(parameters, "INPUT", context),
                                 output=self.parameterAsString(parameters, "OUTPUT", context),
                                 dsm=self._file(parameters, "DSM", context),
                                 landcover=self._file(parameters, "LANDCOVER", context),
                                 vectors=self._file(parameters, "VECTORS", context),
                                 tile=self._optional_int(parameters, "TILE"), overwrite=True)
        Path(opts.output).mkdir(parents=True, exist_ok=True)
        folder = Path(self._run("modalities", opts, feedback))
        caption = ""
        if (folder / "caption.json").is_file():
            caption = json.loads((folder / "caption.json").read_text(encoding="utf-8")).get("caption", "")
        results = {"OUTPUT": str(folder), "CAPTION": caption}
        for key, name in (("EDGES", "edges.tif"), ("SEGMENTATION", "segmentation.tif")):
            if (folder / name).is_file():
                results[key] = str(folder / name)
        return results


class ScoreAlgorithm(_GeosrAlgorithm):
    NUMBERS = {  # output -> path in the JSON report
        "LR_CONSISTENCY_DB": ("faithfulness", "lr_consistency_db"),
        "MAP_MEAN": ("faithfulness", "map", "map_mean"),
        "PSNR_Y": ("full_reference", "psnr_y"),
        "SSIM_Y": ("full_reference", "ssim_y"),
        "LPIPS": ("full_reference", "lpips"),
        "MEAN_IOU": ("semantic", "mean_iou"),
        "APLS": ("roads", "apls"),
    }

    def name(self):
        return "score"

    def displayName(self):
        return "Score an enhanced raster"

    def shortHelpString(self):
        return ("How good and how honest an SR output is: LR-consistency and the hallucination map, with a reference "
                "PSNR-Y / SSIM-Y / LPIPS, land-cover IoU, road connectivity (APLS) and building orientation. "
                "SR must cover the LR's extent on an integer-times finer grid in the same CRS.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer("SR", "Enhanced raster (SR)"))
        self.addParameter(QgsProcessingParameterRasterLayer("LR", "Its input (LR)"))
        self.addParameter(QgsProcessingParameterRasterLayer("REFERENCE", "Reference on the SR grid", optional=True))
        self.addParameter(QgsProcessingParameterVectorLayer("ROADS", "Road centrelines",
                                                            [QgsProcessing.TypeVectorLine], optional=True))
        self.addParameter(QgsProcessingParameterVectorLayer("BUILDINGS", "Building footprints",
                                                            [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterBoolean("LPIPS", "LPIPS (needs the reference)", defaultValue=True))
        self.addParameter(QgsProcessingParameterFileDestination("JSON", "Report (JSON)", "JSON (*.json)"))
        self.addParameter(QgsProcessingParameterFileDestination("HTML", "Report (HTML)", "HTML (*.html)",
                                                                optional=True, createByDefault=False))
        self.addParameter(QgsProcessingParameterRasterDestination("MAP", "Hallucination map", optional=True,
                                                                  createByDefault=False))
        for key in self.NUMBERS:
            self.addOutput(QgsProcessingOutputNumber(key, key.replace("_", " ").title()))

    def processAlgorithm(self, parameters, context, feedback):
        opts = ScoreOptions(sr=self._file(parameters, "SR", context), lr=self._file(parameters, "LR", context),
                            json=self.parameterAsFileOutput(parameters, "JSON", context),
                            reference=self._file(parameters, "REFERENCE", context),
                            roads=self._file(parameters, "ROADS", context),
                            buildings=self._file(parameters, "BUILDINGS", context),
                            html=self.parameterAsFileOutput(parameters, "HTML", context) or None,
                            map=self.parameterAsOutputLayer(parameters, "MAP", context) or None,
                            lpips=self.parameterAsBool(parameters, "LPIPS", context), overwrite=True)
        report = self._run("score", opts, feedback)
        results = {"JSON": opts.json}
        if opts.html:
            results["HTML"] = opts.html
        if opts.map:
            results["MAP"] = opts.map
        for key, path in self.NUMBERS.items():
            value = report
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            results[key] = value if isinstance(value, (int, float)) else None
        return results
