# Blip2Mesh: BLIP-2 (Flan-T5) served as gRPC microservices.
MODEL ?= models/blip2-demo
CONFIG ?= Release

.PHONY: build test run clean

build:
	dotnet build Blip2Mesh.sln -c $(CONFIG) --nologo -clp:ErrorsOnly

test:
	dotnet test Blip2Mesh.sln -c $(CONFIG) --nologo --logger "console;verbosity=normal"

run:
	./blip2mesh generate --model $(MODEL) --image $(MODEL)/samples/sample000.png
	./blip2mesh generate --model $(MODEL) --image $(MODEL)/samples/sample000.png --prompt "Question: what color is the background? Answer:"

clean:
	rm -rf out; find . -name bin -o -name obj -type d -prune -exec rm -rf {} +
