#!/usr/bin/python3
"""A third-party gRPC client of the Blip2Mesh gateway: Python grpcio with stubs generated from protos/ by
clients/python/generate_stubs.sh.

usage: blip2_client.py GATEWAY_ADDRESS REQUESTS_JSONL
Each request line: {"image": PATH, "prompt": TEXT, "options": {...GenerationOptions fields...}}.
Prints one JSON line per request: {"messages": N, "token_ids": [...], "text": "...", "finish_reason": "...",
"usage": {...}} or {"error": {"code": NAME, "message": TEXT}}.
"""
import json
import os
import subprocess
import sys
import tempfile

import grpc

GENERATE_STUBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "clients", "python", "generate_stubs.sh")


def main():
    address, requests = sys.argv[1:3]
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([GENERATE_STUBS, out], check=True)
        sys.path.insert(0, out)
        from blip2.v1 import blip2_pb2, blip2_pb2_grpc

        with grpc.insecure_channel(address) as channel:
            stub = blip2_pb2_grpc.Blip2Stub(channel)
            for line in open(requests, encoding="utf-8"):
                if not line.strip():
                    continue
                spec = json.loads(line)
                request = blip2_pb2.GenerateRequest(prompt=spec.get("prompt", ""),
                                                    options=blip2_pb2.GenerationOptions(**spec.get("options", {})))
                if "image" in spec:
                    request.image = open(spec["image"], "rb").read()
                if "image_id" in spec:
                    request.image_id = spec["image_id"]
                result = {"messages": 0, "token_ids": [], "text": ""}
                try:
                    for response in stub.Generate(request, timeout=120):
                        result["messages"] += 1
                        result["token_ids"] += list(response.token_ids)
                        result["text"] += response.text
                        if response.finish_reason:
                            result["finish_reason"] = response.finish_reason
                            result["usage"] = {"prompt_tokens": response.usage.prompt_tokens,
                                               "generated_tokens": response.usage.generated_tokens,
                                               "cache_hit": response.usage.cache_hit}
                except grpc.RpcError as e:
                    result = {"error": {"code": e.code().name, "message": e.details()}}
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
