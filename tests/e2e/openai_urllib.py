#!/usr/bin/python3
"""The gateway's OpenAI-compatible API from Python's standard library only (urllib, no SDK).

usage: openai_urllib.py BASE_URL IMAGE_PATH PROMPT
Prints three JSON lines: the plain completion {"text", "finish_reason", "usage", "id", "x_request_id"}, the streamed
one {"text", "finish_reason", "usage", "chunks"}, and a refused request {"status", "error"}.
"""
import base64
import json
import mimetypes
import sys
import urllib.error
import urllib.request


def post(base, body):
    request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    return urllib.request.urlopen(request, timeout=60)


def main():
    base, image, prompt = sys.argv[1:4]
    with open(image, "rb") as f:
        url = "data:%s;base64,%s" % (mimetypes.guess_type(image)[0], base64.b64encode(f.read()).decode())
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]}]

    with post(base, {"messages": messages, "max_tokens": 30}) as response:
        completion = json.load(response)
        choice = completion["choices"][0]
        print(json.dumps({"text": choice["message"]["content"], "finish_reason": choice["finish_reason"],
                          "usage": completion["usage"], "id": completion["id"], "x_request_id": response.headers["x-request-id"]}))

    text, finish, usage, chunks = "", None, None, 0
    with post(base, {"messages": messages, "max_tokens": 30, "stream": True, "stream_options": {"include_usage": True}}) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            chunks += 1
            for c in chunk["choices"]:
                text += c["delta"].get("content") or ""
                finish = c.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    print(json.dumps({"text": text, "finish_reason": finish, "usage": usage, "chunks": chunks}))

    try:
        post(base, {"messages": messages, "frequency_penalty": 0.5})
        print(json.dumps({"status": 200}))
    except urllib.error.HTTPError as e:
        print(json.dumps({"status": e.code, "error": json.load(e)["error"]}))


if __name__ == "__main__":
    main()
