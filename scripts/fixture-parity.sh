#!/usr/bin/env bash
# Generates every greedy and beam case of a reference fixture with the CLI and counts those equal to the Hugging Face
# references, as the parity tests check them on CPU.
#   scripts/fixture-parity.sh CLI FIXTURE DEVICE RESULTS
#     CLI      the command to run (./blip2mesh, or a GPU kit's bin/blip2mesh)
#     FIXTURE  a folder with references.json (tests/fixtures/blip2-tiny-a)
#     RESULTS  file for the generations, one JSON result per line
# Prints "<device> parity: N/M generations equal the Hugging Face references". Exit 0 when all are equal, 3 when some
# differ, 1 when generating failed.
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: scripts/fixture-parity.sh CLI FIXTURE DEVICE RESULTS" >&2; exit 2; }
cli="$1" fixture="$2" device="$3" results="$4"

cases="$(mktemp --suffix=.jsonl)"
trap 'rm -f "$cases" "$cases.requests"' EXIT
python3 - "$fixture" > "$cases" <<'PY'
import json, os, sys
fixture = sys.argv[1]
r = json.load(open(os.path.join(fixture, "references.json")))
for image in r["images"]:
    for prompt in image["prompts"]:
        for kind in ("greedy", "beam"):
            request = {"image": os.path.join(fixture, image["file"]), "prompt": prompt["prompt"], "max_new_tokens": r["generation"]["max_new_tokens"]}
            request.update({k: v for k, v in r["generation"][kind].items() if k != "do_sample"})
            print(json.dumps({"request": request, "expected": prompt[kind]["ids"]}))
PY
python3 -c 'import json,sys; [print(json.dumps(json.loads(l)["request"])) for l in open(sys.argv[1])]' "$cases" > "$cases.requests"
"$cli" generate --model "$fixture" --device "$device" --jsonl "$cases.requests" > "$results" || exit 1
python3 - "$cases" "$results" "$device" <<'PY'
import json, sys
expected = [json.loads(l)["expected"] for l in open(sys.argv[1])]
results = [json.loads(l) for l in open(sys.argv[2])]
equal = sum(1 for e, r in zip(expected, results) if r.get("ids") == e)
print(f"{sys.argv[3]} parity: {equal}/{len(expected)} generations equal the Hugging Face references")
sys.exit(0 if equal == len(expected) == len(results) else 3)
PY
