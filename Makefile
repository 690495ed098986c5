# Blip2Mesh: BLIP-2 (Flan-T5) served as gRPC microservices.
MODEL ?= models/blip2-demo
CONFIG ?= Release

.PHONY: build test run up clean e2e-browser

build:
	dotnet build Blip2Mesh.sln -c $(CONFIG) --nologo -clp:ErrorsOnly

# Every test: the .NET suite (parity, generation, the mesh as real processes, Kubernetes manifests), then the
# playground in a real browser.
test:
	dotnet test Blip2Mesh.sln -c $(CONFIG) --nologo --logger "console;verbosity=normal"
	PLAYGROUND_SCREENSHOT=$(CURDIR)/out/playground.png $(MAKE) e2e-browser

# Starts the mesh on the bundled demo model, asks it about the sample images, shuts it down.
run:
	MODEL=$(MODEL) scripts/demo.sh

# Keeps the mesh running for your own clients (Ctrl-C stops it).
up:
	./blip2mesh up --model $(MODEL) --port 50051

# The browser playground end to end: starts the mesh, drives Debian's chromium (apt-get install -y chromium
# fonts-dejavu-core; CHROMIUM=PATH to use another) with playwright-core, writes docs/playground.png
# (or PLAYGROUND_SCREENSHOT).
e2e-browser:
	npm ci --prefix tests/e2e --no-audit --no-fund
	./blip2mesh --help >/dev/null
	node --test tests/e2e/playground.spec.mjs

clean:
	rm -rf out; find . -name bin -o -name obj -type d -prune -exec rm -rf {} +
