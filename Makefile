# Blip2Mesh: BLIP-2 (Flan-T5) served as gRPC microservices.
MODEL ?= models/blip2-demo
CONFIG ?= Release

.PHONY: build test run up clean

build:
	dotnet build Blip2Mesh.sln -c $(CONFIG) --nologo -clp:ErrorsOnly

test:
	dotnet test Blip2Mesh.sln -c $(CONFIG) --nologo --logger "console;verbosity=normal"

# Starts the mesh on the bundled demo model, asks it about the sample images, shuts it down.
run:
	MODEL=$(MODEL) scripts/demo.sh

# Keeps the mesh running for your own clients (Ctrl-C stops it).
up:
	./blip2mesh up --model $(MODEL) --port 50051

clean:
	rm -rf out; find . -name bin -o -name obj -type d -prune -exec rm -rf {} +
