#!/usr/bin/env python3
"""Asks a Blip2Mesh gateway about an image and prints the answer as it streams in.

usage: caption.py IMAGE [--prompt TEXT] [--addr HOST:PORT] [--num-beams N] [--max-new-tokens N] [--api-key KEY]

The stubs come from generate_stubs.sh (run it once); grpcio and protobuf from requirements.txt or Debian's
python3-grpcio and python3-protobuf.
"""
import argparse
import os
import sys

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from blip2.v1 import blip2_pb2, blip2_pb2_grpc
except ImportError:
    sys.exit("caption.py: the gRPC stubs are missing: run clients/python/generate_stubs.sh first")


def main():
    parser = argparse.ArgumentParser(description="Ask a Blip2Mesh gateway about an image.")
    parser.add_argument("image", help="an image file (PNG, JPEG, WebP, GIF or BMP)")
    parser.add_argument("--prompt", default="", help='empty: a caption; or e.g. "Question: what is this? Answer:"')
    parser.add_argument("--addr", default="127.0.0.1:50051", help="the gateway's gRPC address (default 127.0.0.1:50051)")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--api-key", default=os.environ.get("BLIP2MESH_API_KEY"),
                        help="when the gateway requires one (default: $BLIP2MESH_API_KEY)")
    args = parser.parse_args()

    with open(args.image, "rb") as f:
        image = f.read()
    request = blip2_pb2.GenerateRequest(
        image=image, prompt=args.prompt,
        options=blip2_pb2.GenerationOptions(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens))
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    with grpc.insecure_channel(args.addr) as channel:
        stub = blip2_pb2_grpc.Blip2Stub(channel)
        try:
            for response in stub.Generate(request, metadata=metadata, timeout=120):
                print(response.text, end="", flush=True)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE and not e.details().startswith(("vision", "qformer", "decoder")):
                sys.exit(f"caption.py: cannot connect to a gateway at {args.addr}: start the mesh with "
                         "`./blip2mesh up --model DIR` (or `make up`), or give --addr HOST:PORT")
            sys.exit(f"caption.py: {e.code().name}: {e.details()}")
    print()


if __name__ == "__main__":
    main()
