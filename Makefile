# `make demo` and `make test` set everything up on a fresh clone: a virtual environment in .venv with the package
# and its pinned dependencies (constraints.txt), then run the demo or the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test export clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest

# TorchScript (metadata.json and inference.yaml embedded, as MONAI Deploy loads them) and ONNX exports of each
# bundle's default network, traced on a typical input shape with batch and spatial sizes left dynamic.
ONNX_DYNAMIC := "{'dynamo': False, 'input_names': ['image'], 'output_names': ['pred'], \
	'dynamic_axes': {'image': {0: 'batch', 2: 'height', 3: 'width'}, 'pred': {0: 'batch', 2: 'height', 3: 'width'}}}"
export: $(STAMP)
	$(BIN)/python -m monai.bundle ckpt_export network_def --config_file bundles/watnet/configs/inference.yaml \
		--meta_file bundles/watnet/configs/metadata.json --ckpt_file bundles/watnet/models/model.pt \
		--filepath bundles/watnet/models/model.ts --use_trace True --input_shape "[1, 3, 64, 64]"
	$(BIN)/python -m monai.bundle onnx_export network_def --config_file bundles/watnet/configs/inference.yaml \
		--ckpt_file bundles/watnet/models/model.pt --filepath bundles/watnet/models/model.onnx \
		--use_trace True --input_shape "[1, 3, 64, 64]" --converter_kwargs $(ONNX_DYNAMIC)

clean:
	rm -rf $(VENV) demo_output .pytest_cache
