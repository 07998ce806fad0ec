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

# two workers (pytest-xdist), each running whole test files; the 15 slowest tests are listed at the end
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations 15

# TorchScript (metadata.json and inference.yaml embedded, as MONAI Deploy loads them) and ONNX exports of each
# bundle's default network from its models/model.pt; rerun after replacing a model.pt. model.ts is scripted
# (torch.jit.script, no --use_trace, as the MONAI model zoo's CI exports), so every shape check and branch of the
# network's forward is kept. model.onnx is traced (ONNX export needs a trace) on EXPORT_SHAPE_<bundle> with batch,
# height and width left dynamic. vct_adc7t is traced at 192 x 224, not at its 176 x 208 slices: its position
# embeddings, stored for the 11 x 13 token grid of 176 x 208, are resized only when the grid differs, so a trace at
# 176 x 208 would leave the resize out and fail at any other size; traced at 192 x 224, the bicubic resize follows
# the input size and is exactly the identity at 176 x 208.
EXPORT_SHAPE_watnet := [1, 3, 64, 64]
EXPORT_SHAPE_gan_unet_t1w7t := [1, 3, 192, 224]
EXPORT_SHAPE_vct_adc7t := [1, 2, 192, 224]
ONNX_DYNAMIC := "{'dynamo': False, 'input_names': ['image'], 'output_names': ['pred'], \
	'dynamic_axes': {'image': {0: 'batch', 2: 'height', 3: 'width'}, 'pred': {0: 'batch', 2: 'height', 3: 'width'}}}"
# $(call export_bundle,<bundle>): the commands that write bundles/<bundle>/models/model.ts and model.onnx
define export_bundle
	$(BIN)/python -m monai.bundle ckpt_export network_def --config_file bundles/$(1)/configs/inference.yaml \
		--meta_file bundles/$(1)/configs/metadata.json --ckpt_file bundles/$(1)/models/model.pt \
		--filepath bundles/$(1)/models/model.ts
	$(BIN)/python -m monai.bundle onnx_export network_def --config_file bundles/$(1)/configs/inference.yaml \
		--ckpt_file bundles/$(1)/models/model.pt --filepath bundles/$(1)/models/model.onnx \
		--use_trace True --input_shape "$(EXPORT_SHAPE_$(1))" --converter_kwargs $(ONNX_DYNAMIC)
endef
export: $(STAMP)
	$(call export_bundle,watnet)
	$(call export_bundle,gan_unet_t1w7t)
	$(call export_bundle,vct_adc7t)

clean:
	rm -rf $(VENV) demo_output .pytest_cache

# MONAI Bundle archives dist/<bundle>_v<version>.zip with synth7t vendored (scripts/build_release.py, README "Deploy");
# options through RELEASE_ARGS, e.g. RELEASE_ARGS="--bundles watnet --fetch models/model.onnx --base_url <url>".
.PHONY: release
release: $(STAMP)
	$(BIN)/python scripts/build_release.py $(RELEASE_ARGS)

# `make zoo-check` (scripts/zoo_check.py, README "Deploy"): the MONAI model zoo CI's checks, with this project's code,
# on the release archives unpacked in $(ZOO_DIR)/models, each in a virtual environment holding only the packages of
# its metadata (cached in $(ZOO_DIR)/venv), plus its unit test tests/zoo/test_<bundle>.py; on demand, not in
# `make test`. Options through ZOO_CHECK_ARGS, e.g. ZOO_CHECK_ARGS="--bundles watnet".
ZOO_DIR ?= build/zoo
.PHONY: zoo-check
zoo-check: $(STAMP)
	$(BIN)/python scripts/zoo_check.py --work_dir $(ZOO_DIR) --python $(PYTHON) $(ZOO_CHECK_ARGS)

# The MONAI Deploy app (apps/monai_deploy/app.py) in its own virtual environment: monai-deploy-app-sdk, holoscan and
# what they need (apps/monai_deploy/requirements.txt) beside the repository, then its test, which $(VENV) skips.
DEPLOY_VENV ?= .venv-monai-deploy
DEPLOY_BIN := $(DEPLOY_VENV)/bin
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed

.PHONY: monai-deploy-test

$(DEPLOY_STAMP): pyproject.toml constraints.txt apps/monai_deploy/requirements.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_BIN)/python -m pip install --quiet -c constraints.txt -r apps/monai_deploy/requirements.txt -e ".[test]"
	touch $(DEPLOY_STAMP)

monai-deploy-test: $(DEPLOY_STAMP)
	$(DEPLOY_BIN)/python -m pytest tests/test_monai_deploy.py

# MONAI Label serving every bundle (apps/monailabel, README "Deploy"), in its own virtual environment, then its test,
# which $(VENV) skips. MONAI Label imports torchvision, whose registry wheels are built against the registry's
# standard (CUDA) torch and fail to load beside a CPU-only torch: this environment takes torch 2.13.0 from the
# registry, with pip's config and find-links cleared so that a local torch+cpu wheel is not picked instead.
MONAILABEL_VENV ?= .venv-monailabel
MONAILABEL_BIN := $(MONAILABEL_VENV)/bin
MONAILABEL_STAMP := $(MONAILABEL_VENV)/.installed

.PHONY: monailabel-test

$(MONAILABEL_STAMP): pyproject.toml constraints.txt apps/monailabel/requirements.txt
	$(PYTHON) -m venv $(MONAILABEL_VENV)
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(MONAILABEL_BIN)/python -m pip install --quiet \
		torch==2.13.0 torchvision==0.28.0
	$(MONAILABEL_BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]" -r apps/monailabel/requirements.txt
	$(MONAILABEL_BIN)/python -m pip install --quiet --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
	touch $(MONAILABEL_STAMP)

monailabel-test: $(MONAILABEL_STAMP)
	$(MONAILABEL_BIN)/python -m pytest tests/test_monailabel.py

# Benchmarks (benchmarks/, README "Benchmarks"): speed, memory and quality of every bundle, written to
# benchmarks/results/bench.{json,md}; options through BENCH_ARGS, e.g. BENCH_ARGS="--parts \"['inference']\"".
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# `make gpu-check` (benchmarks/gpu_check.py, README "Benchmarks"): every GPU code path of the bundles run once with a
# pass or fail (AMP, torch.compile, flash attention, torchrun over NCCL, TorchScript and ONNX Runtime parity,
# whole-volume and VCT paper-scale timings), written to benchmarks/results/gpu.{json,md}; exits 1 when a case failed.
# Without CUDA it runs the CPU smoke instead (toy sizes, the same functions), into a temporary folder so that committed
# results stay; CI runs the smoke through tests/test_gpu_check.py. Options through GPU_CHECK_ARGS, e.g.
# GPU_CHECK_ARGS="--bundles \"['vct_adc7t']\"" or GPU_CHECK_ARGS="--smoke --output_dir /tmp/smoke".
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check $(GPU_CHECK_ARGS)
