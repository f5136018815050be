"""The user's land cover, vectors and DSM as conditions of ``--model mmsr`` (issue 4), on a tiny random checkpoint."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import rasterio
from affine import Affine

pytest.importorskip("diffusers")

from conftest import texture, tiny_mmsr_config  # noqa: E402

from geosr.conditioning import CLASSES  # noqa: E402
from geosr.conditioning.base import ClassTable  # noqa: E402
from geosr.conditioning.user import UNMAPPED, class_lookup, model_class, relabel  # noqa: E402
from geosr.config import EnhanceConfig  # noqa: E402
from geosr.errors import ConditionError, ConfigError  # noqa: E402
from geosr.models.mmsr.bundle import MMSRBundle, build_bundle  # noqa: E402
from geosr.scene import enhance_scene  # noqa: E402

TINY = tiny_mmsr_config()
WATER, VEGETATION, OTHER, BRIGHT = (CLASSES.index(c) for c in ("water", "vegetation", "other", "bright"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    bundle = build_bundle(TINY, seed=0)
    return bundle.save(tmp_path_factory.mktemp("mmsr") / "tiny")


def config(checkpoint, **kw) -> EnhanceConfig:
    return EnhanceConfig(**({"model": "mmsr", "checkpoint": str(checkpoint), "steps": 1, "tile": 16, "overlap": 4,
                             "threads": 1} | kw))


@pytest.fixture
def seen(monkeypatch):
    """Every segmentation the bundle tokenizes, with the output grid of its tile: ``[(seg (H, W), transform)]``."""
    from geosr.models.mmsr import model as mmsr_model

    calls = []
    original = MMSRBundle.conditions
    grids = {}

    def conditions(self, images, *, segmentation=None):
        calls.append((None if segmentation is None else segmentation[0].copy(), grids.get("current")))
        return original(self, images, segmentation=segmentation)

    original_user = mmsr_model.MMSRModel._user_segmentation

    def user_segmentation(self, cond, scale):
        grids["current"] = self._tile_grid.transform @ Affine.scale(1 / scale)
        return original_user(self, cond, scale)

    monkeypatch.setattr(MMSRBundle, "conditions", conditions)
    monkeypatch.setattr(mmsr_model.MMSRModel, "_user_segmentation", user_segmentation)
    return calls


def centres_x(transform: Affine, shape) -> np.ndarray:
    cols = np.arange(shape[1])
    return np.broadcast_to(transform.c + (cols + 0.5) * transform.a, shape)


# ------------------------------------------------------------------------------------------------ class names


def test_user_class_names_map_onto_the_models_vocabulary():
    cases = {"Open Water": WATER, "Deciduous Forest": VEGETATION, "Tree canopy": VEGETATION, "grass": VEGETATION,
             "Building": BRIGHT, "bare soil": BRIGHT, "road": OTHER, "Parking lot": OTHER,
             "Impervious surfaces": OTHER, "shadow": CLASSES.index("shadow"), "park": VEGETATION}
    for name, expected in cases.items():
        assert model_class(name) == expected, name
    for name in ("none", "unlabelled", "Unclassified", "class 7", "Developed, Open Space"):
        assert model_class(name) == UNMAPPED, name
    lookup = class_lookup(ClassTable({0: "unlabelled", 1: "road", 2: "building", 3: "water", 9: "class 9"}))
    assert lookup == {1: OTHER, 2: BRIGHT, 3: WATER}
    np.testing.assert_array_equal(relabel(np.array([[0, 1, 2, 3, 9]]), lookup),
                                  [[UNMAPPED, OTHER, BRIGHT, WATER, UNMAPPED]])


# ------------------------------------------------------------------------------------------------ land cover


def _landcover_4326(make_tif, scene_path, *, name="lc.tif", offset_deg=0.0):
    """Land cover in EPSG:4326 over the scene: "Open water" west of the scene's middle, "Deciduous forest" east."""
    from rasterio.warp import transform_bounds

    with rasterio.open(scene_path) as src:
        left, bottom, right, top = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    split = (left + right) / 2
    res = (right - left) / 400
    margin = 400  # px beyond the scene on every side: the engine's tiles reach past its edges (reflect padding)
    transform = Affine(res, 0, left - margin * res + offset_deg, 0, -res, top + margin * res)
    x = transform.c + (np.arange(400 + 2 * margin) + 0.5) * res
    classes = np.where(x < split + offset_deg, 1, 2).astype(np.uint8)
    path = make_tif(np.tile(classes, (int((top - bottom) / res) + 2 * margin, 1)), name, crs="EPSG:4326",
                    transform=transform)
    cats = "".join(f"<Category>{c}</Category>" for c in ("none", "Open water", "Deciduous forest"))
    path.with_name(path.name + ".aux.xml").write_text(
        f'<PAMDataset><PAMRasterBand band="1"><CategoryNames>{cats}</CategoryNames></PAMRasterBand></PAMDataset>')
    return path, split


def test_landcover_in_another_crs_replaces_the_heuristic_on_each_tiles_georeferenced_grid(
        checkpoint, make_tif, tmp_path, seen):
    from pyproj import Transformer

    scene = make_tif(texture((3, 40, 40)), "scene.tif")  # EPSG:32632, 0.5 m
    lc, split_lon = _landcover_4326(make_tif, scene)
    result = enhance_scene(scene, tmp_path / "out.tif", config(checkpoint, landcover=str(lc)))
    # every tile got the user's classes, water exactly west of the split (its UTM x at the scene's latitude)
    with rasterio.open(scene) as src:
        lat = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True).transform(*src.xy(20, 20))[1]
    split_x = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True).transform(split_lon, lat)[0]
    caption, tiles = seen[0], seen[1:]  # the scene's caption first (the heuristic of its overview), then the tiles
    assert caption[0] is None and len(tiles) == result.tiles and all(seg is not None for seg, _ in tiles)
    agree, total = 0, 0
    for seg, transform in tiles:
        assert set(np.unique(seg)) <= {WATER, VEGETATION}
        x = centres_x(transform, seg.shape)
        far = np.abs(x - split_x) > 0.5  # off the boundary by more than one LR pixel (the warp's nearest cell)
        agree += int(((seg == WATER) == (x < split_x))[far].sum())
        total += int(far.sum())
    assert total > 0 and agree / total > 0.999, agree / total
    with rasterio.open(result.path) as out:
        sources = json.loads(out.tags()["GEOSR_CONDITIONS"])
    assert str(lc) in sources["segmentation"] and sources["depth"].startswith("none")

    # the conditions reach the model: without the land cover the same run gives another output
    seen.clear()
    plain = enhance_scene(scene, tmp_path / "plain.tif", config(checkpoint))
    assert all(seg is None for seg, _ in seen)  # the heuristic, inside the bundle, as in training
    with rasterio.open(result.path) as a, rasterio.open(plain.path) as b:
        assert a.transform == b.transform and not np.array_equal(a.read(), b.read())
        assert "GEOSR_CONDITIONS" in b.tags() and "heuristic" in json.loads(b.tags()["GEOSR_CONDITIONS"])[
            "segmentation"]


# ------------------------------------------------------------------------------------------------ vectors, DSM


@pytest.fixture
def alexandria(data, make_tif):
    """A 48 x 48 RGB texture on the Alexandria DSM's grid (EPSG:26918, 2 m), over the densest buildings."""
    with rasterio.open(data / "height" / "alexandria_hag_2m.tif") as src:
        hag = src.read(1)
        tall = np.argwhere(hag > 3)
        r, c = (int(v) for v in np.median(tall, axis=0))
        r, c = min(max(r - 24, 0), src.height - 48), min(max(c - 24, 0), src.width - 48)
        transform = src.transform * Affine.translation(c, r)
        crs = src.crs
    return make_tif(texture((3, 48, 48), seed=3), "alexandria.tif", crs=crs.to_string(), transform=transform)


def test_vector_buildings_are_bright_where_their_footprints_lie(checkpoint, alexandria, data, tmp_path, seen):
    import shapely
    from rasterio.features import rasterize

    from test_modalities import footprints_in

    buildings = data / "vectors" / "alexandria_buildings.geojson"
    truth = footprints_in(buildings, "EPSG:26918")
    enhance_scene(alexandria, tmp_path / "out.tif", config(checkpoint, vectors=str(buildings)))
    inside, covered = 0, 0
    for seg, transform in seen[1:]:
        mask = rasterize([truth], out_shape=seg.shape, transform=transform).astype(bool)
        inside += int(mask.sum())
        covered += int((seg[mask] == BRIGHT).sum())
    assert inside > 1000 and covered / inside > 0.97, (inside, covered)
    assert shapely.area(truth) > 0


def test_a_dsm_with_a_checkpoint_trained_without_depth_is_reported_not_used(checkpoint, alexandria, data, tmp_path,
                                                                          caplog):
    dsm = data / "height" / "alexandria_dsm_2m.tif"
    with caplog.at_level(logging.WARNING, logger="geosr"):
        result = enhance_scene(alexandria, tmp_path / "out.tif", config(checkpoint, dsm=str(dsm)))
    assert sum("is not used" in r.getMessage() and "depth" in r.getMessage() for r in caplog.records) == 1
    with rasterio.open(result.path) as out:
        assert "no depth tokenizer" in json.loads(out.tags()["GEOSR_CONDITIONS"])["depth"]


# ------------------------------------------------------------------------------------------------ bad input


def test_user_data_errors_are_one_line_and_name_the_file(checkpoint, make_tif, tmp_path):
    scene = make_tif(texture((3, 40, 40)), "scene.tif")
    lc, _ = _landcover_4326(make_tif, scene)
    with pytest.raises(ConfigError, match=r"--landcover: model bicubic does not read.*--model mmsr"):
        enhance_scene(scene, tmp_path / "a.tif", EnhanceConfig(model="bicubic", landcover=str(lc)))
    far, _ = _landcover_4326(make_tif, scene, name="far.tif", offset_deg=5.0)
    with pytest.raises(ConditionError, match="far.tif: land-cover raster does not overlap the scene") as err:
        enhance_scene(scene, tmp_path / "b.tif", config(checkpoint, landcover=str(far)))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "a.tif").exists() and not (tmp_path / "b.tif").exists()


def test_the_cli_passes_the_users_files_to_the_engine(checkpoint, make_tif, tmp_path):
    from geosr.cli import main

    scene = make_tif(texture((3, 40, 40)), "scene.tif")
    lc, _ = _landcover_4326(make_tif, scene)
    out = tmp_path / "cli.tif"
    assert main(["enhance", str(scene), "-o", str(out), "--model", "mmsr", "--checkpoint", str(checkpoint),
                 "--steps", "1", "--tile", "16", "--overlap", "4", "--threads", "1", "--landcover", str(lc),
                 "--quiet"]) == 0
    with rasterio.open(out) as ds:
        assert str(lc) in json.loads(ds.tags()["GEOSR_CONDITIONS"])["segmentation"]
        assert json.loads(ds.tags()["GEOSR_PARAMETERS"])["landcover"] == str(lc)


# ------------------------------------------------------------------------------------------------ ablation: --drop


def test_dropped_conditions_stop_mattering(checkpoint, make_tif, tmp_path):
    from geosr.models.mmsr.model import parse_drop

    assert parse_drop("text,seg,edge") == {"text", "segmentation", "edges"} and parse_drop(None) == frozenset()
    with pytest.raises(ConfigError, match="--drop colour: unknown condition"):
        parse_drop("colour")
    scene = make_tif(texture((3, 40, 40)), "scene.tif")
    lc, _ = _landcover_4326(make_tif, scene)

    def run(name, **kw):
        path = enhance_scene(scene, tmp_path / f"{name}.tif", config(checkpoint, **kw)).path
        with rasterio.open(path) as ds:
            return ds.read()

    # with the segmentation dropped, the user's land cover no longer changes anything; with it, it does
    np.testing.assert_array_equal(run("a", landcover=str(lc), drop="segmentation"), run("b", drop="segmentation"))
    assert not np.array_equal(run("c", landcover=str(lc)), run("d"))
    assert not np.array_equal(run("e", drop="edges"), run("d2"))


def test_drop_text_masks_the_caption_entirely(checkpoint):
    import torch

    bundle = MMSRBundle.load(checkpoint)
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def sample(prompt, drop_text):
        return bundle.pipeline(lr, prompt=prompt, num_inference_steps=1, drop_text=drop_text, output_type="np",
                               generator=torch.Generator().manual_seed(1)).images

    # masked keys: the two captions differ only in how many padded keys there are (float rounding, ~1e-7)
    np.testing.assert_allclose(sample("dense buildings", True), sample("open water", True), atol=1e-5)
    assert np.abs(sample("dense buildings", False) - sample("open water", False)).max() > 1e-3
