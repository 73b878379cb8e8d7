# One-line wrappers; CI (.ci/run) runs `make install`, `make lint` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch pin: a CPU build here (it lies on this machine's disk), the CUDA build from the index elsewhere.
TORCH  ?= torch==2.13.0
# Pixels are bit-exact with the reference at this Pillow (image resizing is Pillow-version sensitive).
PILLOW ?= pillow==13.0.0
DEMO   := models/demo-tiny

.PHONY: install test test-all demo quantize export lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "vl2edge needs Python >= 3.10"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "$(PILLOW)"
	$(PY) -m pip install -q -e ".[torch,export,serve,pdf,ray,dev]"
	touch $@

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

# The whole pipeline on a tiny random-weight model the project writes itself: the answer is noise.
demo: install $(DEMO)/config.json
	$(VENV)/bin/vl2edge run --model $(DEMO) --image models/demo.png --prompt "Describe this image." --max-new-tokens 48

$(DEMO)/config.json: | install
	$(PY) -m vl2edge.synthetic --preset test-mha --out $(DEMO) --sample-image models/demo.png

# make quantize|export [MODEL=dir-or-hub-id] [RECIPE=int4-experts|int8|int4|float32] [OUT=dir]; MODEL defaults
# to the demo model (written first if missing)
MODEL  ?= $(DEMO)
RECIPE ?= int4-experts
MODEL_DEPS = install $(if $(filter $(DEMO),$(MODEL)),$(DEMO)/config.json)

quantize: $(MODEL_DEPS)
	$(VENV)/bin/vl2edge quantize $(MODEL) $(or $(OUT),models/$(notdir $(MODEL))-$(RECIPE)) --recipe $(RECIPE)

export: $(MODEL_DEPS)
	$(VENV)/bin/vl2edge export --model $(MODEL) --out $(or $(OUT),models/$(notdir $(MODEL))-onnx-$(RECIPE)) \
		--recipe $(RECIPE)

# ruff (style, imports, common bugs) and mypy (basic mode: the annotated seams; config in pyproject.toml)
lint: install
	$(PY) -m ruff check vl2edge quant export tests bench
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
