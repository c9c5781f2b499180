# edge-gemma. `make setup` builds .venv in the checkout (torch 2.13.0 CPU first); every other target calls it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.edge-gemma-installed

VARIANT ?=
CHECKPOINT ?=
QUANT ?= int4
BACKENDS ?=
OUT ?=
CONTEXT ?= 4096

.PHONY: setup test test-fast demo verify quantize export run bench bench-load bench-onnx bench-peers pi-install pi-emulate android-bundle clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV) $(PYTHON)
	touch $(STAMP)

# The README's test command. `.ci/run` calls exactly this.
# Two workers (the machines have 2 cores; the tests run torch on one thread each); each test module runs whole on one
# worker, so its session fixtures and on-disk caches are built once. PYTEST_ARGS="-n 0" runs serially.
test: setup
	$(PY) -m pytest -q -rs --durations=25 -n 2 --dist loadfile $(PYTEST_ARGS)

# The fast tier: the unit tests (marker `unit`, tests/conftest.py), no export; about a minute after `make setup`.
test-fast: setup
	$(PY) -m pytest -q -rs -m unit -n 0 $(PYTEST_ARGS)

# The README's main command: the main job on the embedded default model. Exports it (int4, every implemented
# backend, fidelity checked) to artifacts/default-int4/, then answers a prompt from the artifact, streamed.
demo: setup
	$(VENV)/bin/edge-gemma export default --quant int4 --out artifacts/default-int4 --force
	$(VENV)/bin/edge-gemma run artifacts/default-int4 --prompt "$(PROMPT)" --stats

# make export [VARIANT=e2b|e4b] [CHECKPOINT=dir] [QUANT=int4] [BACKENDS=onnx] [OUT=dir] [CONTEXT=4096]
# Writes artifacts/<name>-<quant>/ (name: the variant, the checkpoint folder, or `default` for the embedded model).
# --quant is passed only when QUANT is given, so a CHECKPOINT made by `edge-gemma quantize` keeps its own recipe.
export: setup
	$(VENV)/bin/edge-gemma export $(CHECKPOINT) $(if $(VARIANT),--variant $(VARIANT)) $(if $(filter command line environment,$(origin QUANT)),--quant $(QUANT)) $(if $(BACKENDS),--backends $(BACKENDS)) $(if $(OUT),--out $(OUT)) $(if $(DRAFTER),--drafter $(DRAFTER)) --context $(CONTEXT)

PROMPT ?= What does json.dumps do?
ARTIFACT ?= artifacts/default-int4
run: setup
	$(VENV)/bin/edge-gemma run $(ARTIFACT) --prompt "$(PROMPT)"

verify: setup
	$(VENV)/bin/edge-gemma verify $(if $(CHECKPOINT),$(CHECKPOINT),default) $(if $(DRAFTER),--drafter $(DRAFTER))

quantize: setup
	$(VENV)/bin/edge-gemma quantize $(if $(CHECKPOINT),$(CHECKPOINT),default) --recipe $(QUANT) --out $(if $(OUT),$(OUT),artifacts/$(if $(CHECKPOINT),$(notdir $(CHECKPOINT)),default)-$(QUANT)-quantized)

# make bench [ARTIFACT=artifacts/default-int4] [BACKEND=onnx]: `edge-gemma bench` on an artifact (by default the one
# `make demo` writes); `make bench-load`: load time and memory of a full-size checkpoint's decoder.
bench: setup
	$(VENV)/bin/edge-gemma bench $(ARTIFACT) $(if $(BACKEND),--backend $(BACKEND)) --ignore-eos

bench-load: setup
	$(PY) benchmarks/bench_load.py

# make bench-onnx CHECKPOINT=/work/synthetic/e2b [OUT=dir] [RUNS=3] [BENCH_ARGS="--profile"]
# int4 ONNX export (text graphs: the audio graph's export does not finish at full size yet), timed, then RUNS x bench.
bench-onnx: setup
	$(PY) benchmarks/bench_onnx.py --checkpoint $(or $(CHECKPOINT),$(error pass CHECKPOINT=<checkpoint dir>)) --artifact $(or $(OUT),artifacts/$(notdir $(CHECKPOINT))-$(QUANT)) --quant $(QUANT) --context $(CONTEXT) --threads 2 --prompt-tokens 512 --new-tokens 128 --runs $(or $(RUNS),3) --no-check --text-only $(BENCH_ARGS)

# make bench-peers [CHECKPOINT=dir] [RUNTIMES=llama.cpp-q4_0,ours/onnx,...] [ROUNDS=3]
# llama.cpp and our backends side by side on one checkpoint (default: the synthetic full-size E2B), interleaved,
# medians of fresh processes; builds and caches everything under .cache/peers/ (hours and tens of GB the first time).
# Writes benchmarks/results/peers-e2b-int4.{json,md,png}. Not part of `make test`.
bench-peers: setup
	$(PY) benchmarks/peers/run.py $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(if $(RUNTIMES),--runtimes $(RUNTIMES)) --rounds $(or $(ROUNDS),3)

# make pi-install [PI_EXTRAS=onnx,listen|litert,listen]: on a Raspberry Pi 5 (Raspberry Pi OS Bookworm 64-bit, Python
# 3.11). Installs the runtime only (numpy, tokenizers, one backend; no torch) into .venv-pi.
PI_VENV ?= .venv-pi
PI_EXTRAS ?= onnx,listen
pi-install:
	@dpkg-query -W libportaudio2 espeak-ng >/dev/null 2>&1 || echo "note: for listen/--speak: sudo apt-get install python3-venv libportaudio2 espeak-ng"
	python3 -m venv $(PI_VENV)
	$(PI_VENV)/bin/pip install -q --upgrade pip
	$(PI_VENV)/bin/pip install -q ".[$(PI_EXTRAS)]"
	@$(PI_VENV)/bin/python -c "import sys, edge_gemma.cli, edge_gemma.commands.run; assert 'torch' not in sys.modules"
	@echo "installed in $(PI_VENV). Copy an artifact exported on a PC, then:"
	@echo "  $(PI_VENV)/bin/edge-gemma run ARTIFACT --prompt 'Hello' --threads 4 --stats"
	@echo "  $(PI_VENV)/bin/edge-gemma listen ARTIFACT"

# The same install in an emulated Pi 5 (bookworm arm64 under qemu-aarch64-static), cached in .cache/pi5-rootfs.
# Then: .venv/bin/python scripts/pi_emulation.py run -- edge-gemma run ARTIFACT --prompt Hi
pi-emulate: setup
	$(PY) scripts/pi_emulation.py prepare

# make android-bundle ARTIFACT=artifacts/<name> [DEVICE=1] [NAME=...]: the artifact (exported with the litert backend)
# into android_demo/app/src/main/assets; DEVICE=1 leaves the .litertlm out of the APK and prints the adb push command.
android-bundle: setup
	$(PY) scripts/android_bundle.py $(ARTIFACT) $(if $(DEVICE),--device) $(if $(NAME),--name $(NAME))

clean-venv:
	rm -rf $(VENV)
