# Two commands do all set-up on a fresh Debian/Ubuntu machine with Python 3.10-3.12:
#   make demo   - build a demo archive into model_store/, serve it with stock torchserve, query it
#   make test   - unit tests and end-to-end tests against a real torchserve on loopback
PYTHON ?= python3
VENV ?= .venv
# torch first, pinned: on the reference machines these wheels come from a local cache. Override
# for another platform, e.g. make test TORCH_SPEC="torch==2.9.1 torchvision==0.24.1".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tsgpu-installed
TEST_STAMP := $(VENV)/.tsgpu-test-installed

.PHONY: demo test bench clean help prometheus-tools ffmpeg-libs gpu-bundle

help:
	@echo "make demo   - demo classifier end to end through a real torchserve"
	@echo "make test   - all tests (unit + end-to-end)"
	@echo "make bench  - serving benchmark: our handler vs TorchServe's stock handler"
	@echo "make bench AGAINST=REV - also this tree's handler vs the one at git revision REV (regression)"
	@echo "make clean  - remove .venv and built archives"
	@echo "make gpu-bundle - the small bundle a GPU window installs (docs/gpu-verification.md)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if (3, 10) <= v[:2] <= (3, 12) else "Python 3.10-3.12 is required, found %d.%d: set PYTHON=python3.11 (for example)" % v[:2])'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Tests also run the DALI backend as a CPU pipeline: install it, and fail (not skip) without it.
# [dali] is the CUDA 13 build; a venv made before it held the CUDA 12 one (and its nvImageCodec
# libraries), whose files have the same paths: remove those first, or uninstalling them later would
# delete the CUDA 13 files.
CU12_DALI := nvidia-dali-cuda120 nvidia-nvimgcodec-cu12 nvidia-nvjpeg-cu12 nvidia-nvjpeg2k-cu12 \
	nvidia-nvtiff-cu12 nvidia-libnvcomp-cu12
# Ultralytics (YOLO-seg/pose and RT-DETR built from their YAML prove the export formats) goes in without its
# declared dependencies: its opencv-python would shadow opencv-python-headless (both are cv2), and what its
# import and export need is already installed.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip uninstall --quiet --yes $(CU12_DALI) 2>/dev/null || true
	$(PY) -m pip install --quiet -e '.[dev,dali]'
	$(PY) -m pip install --quiet --no-deps 'ultralytics>=8.4,<8.5'
	@touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/tsgpu demo --model-store model_store

# promtool and a Prometheus server for tests/deploy: Debian's `prometheus` package, installed here when
# running as root; otherwise stop and name the package.
prometheus-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq prometheus >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus; }; \
	  else echo "tests/deploy need promtool and prometheus: install the Debian package 'prometheus' (sudo apt-get install prometheus)"; exit 1; fi; }

# FFmpeg's shared libraries for torchcodec (video archives): Debian's `ffmpeg` package, installed here
# when running as root; otherwise stop and name the package. (PyAV's wheels bundle their own FFmpeg.)
ffmpeg-libs:
	@command -v ffmpeg >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq ffmpeg >/dev/null || { apt-get update -qq && apt-get install -y -qq ffmpeg >/dev/null; }; \
	  else echo "video tests need FFmpeg's libraries for torchcodec: install the Debian package 'ffmpeg' (sudo apt-get install ffmpeg)"; exit 1; fi; }

test: $(TEST_STAMP) prometheus-tools ffmpeg-libs
	TSGPU_REQUIRE_DALI=1 $(PY) -m pytest -q -rs tests

# The bundle a GPU window installs (TorchServe's Python package without its Java frontend jar,
# torch-model-archiver, pycocotools for the GPU host's Python 3.12, pytest-timeout): about 1 MiB,
# with its sha256, in gpu-bundle/ (git-ignored). Needs pip and a package index, not the venv.
GPU_BUNDLE ?= gpu-bundle
gpu-bundle:
	$(PYTHON) -m benchmarks.gpu_check bundle --out $(GPU_BUNDLE)

bench: $(STAMP)
	$(PY) -m pip install --quiet captum  # TorchServe's stock vision handler imports it
	$(PY) -m benchmarks.serving
	$(if $(AGAINST),$(PY) -m benchmarks.regression --against $(AGAINST))

clean:
	rm -rf $(VENV) model_store/*.mar model_store/.*-build .pytest_cache
