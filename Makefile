# Blip2Mesh: BLIP-2 (Flan-T5) served as gRPC microservices.
MODEL ?= models/blip2-demo
CONFIG ?= Release
# `make up` and `make run`: the gateway's gRPC port, and its HTTP port (JSON API, playground; PORT+1 when empty).
PORT ?= 50051
HTTP_PORT ?=

.PHONY: build test run up clean e2e-browser gpu-kit gpu-kit-check

build:
	dotnet build Blip2Mesh.sln -c $(CONFIG) --nologo -clp:ErrorsOnly

# Every test: the .NET suite (parity, generation, the mesh as real processes, Kubernetes manifests), then the
# playground in a real browser. Installs the Debian packages the tests use when they are missing (scripts/install-deps.sh).
test:
	scripts/install-deps.sh test
	dotnet test Blip2Mesh.sln -c $(CONFIG) --nologo --logger "console;verbosity=normal"
	PLAYGROUND_SCREENSHOT=$(CURDIR)/out/playground.png $(MAKE) e2e-browser

# Starts the mesh on the bundled demo model, asks it about the sample images, shuts it down.
run:
	scripts/install-deps.sh run
	MODEL=$(MODEL) PORT=$(PORT) HTTP_PORT=$(HTTP_PORT) scripts/demo.sh

# Keeps the mesh running for your own clients (Ctrl-C stops it): make up PORT=60051 HTTP_PORT=60080 for other ports.
up:
	scripts/install-deps.sh run
	./blip2mesh up --model $(MODEL) --port $(PORT)$(if $(HTTP_PORT), --http-port $(HTTP_PORT))

# The browser playground and the OpenAI SDK (tests/e2e/openai.spec.mjs) end to end: starts the mesh, drives Debian's chromium (apt-get install -y chromium
# fonts-dejavu-core; CHROMIUM=PATH to use another) with playwright-core, writes docs/playground.png
# (or PLAYGROUND_SCREENSHOT).
e2e-browser:
	npm ci --prefix tests/e2e --no-audit --no-fund
	./blip2mesh --help >/dev/null
	node --test tests/e2e/playground.spec.mjs tests/e2e/openai.spec.mjs

# The GPU kit (docs/gpu.md): the CLI self-contained with ONNX Runtime's CUDA provider, for GPU machines without .NET,
# in parts of at most 40 MiB under out/gpu-kit/parts (GPU_ARCH=90 by default: the H200's kernels only; GPU_ARCH=all).
gpu-kit:
	scripts/gpu-kit.sh build

# The built kit checked here, no GPU needed: reassembled in a fresh folder, tiny-a parity on CPU with no dotnet on PATH.
gpu-kit-check:
	scripts/gpu-kit.sh check

clean:
	rm -rf out; find . -name bin -o -name obj -type d -prune -exec rm -rf {} +
