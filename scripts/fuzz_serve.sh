#!/usr/bin/env bash
# Fuzz `dgemma serve` with schemathesis (4.x) against its own /openapi.json.
#
#   scripts/fuzz_serve.sh                       # starts a server on a free loopback port, stops it at the end
#   URL=http://127.0.0.1:8811 scripts/fuzz_serve.sh   # fuzz a running server instead
#
# Knobs (env): EXAMPLES (30 per operation and phase), MAX_TIME (240 s, schemathesis is killed after it),
# REQ_TIMEOUT (60 s: a request slower than this counts as a hang), CHECKS (default: 5xx + response
# conformance), MODEL (dgemma-default), API_KEY (sent as a bearer token), OUT (report folder).
# A schemathesis hook makes generated bodies useful and cheap: a string `model` becomes $MODEL (else every
# request is a 404), a valid max_denoising_steps above 4 becomes 4 and a valid max_tokens /
# max_completion_tokens above 64 becomes 64, a valid n above 4 becomes 4, a batch of prompts keeps its first 2
# (invalid values are left alone, so the 400 paths are fuzzed), and positive cases drop the OpenAI fields dgemma
# refuses unless neutral (suffix, ...), tool_choice "none" with tools (the shipped model cannot take them),
# and get a non-empty prompt.
# Exit status 1 if any response was a 5xx, any request failed or timed out, or the run hit MAX_TIME;
# conformance findings (e.g. undocumented 400/404 codes) are printed but do not fail the run.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate 2>/dev/null || true
command -v schemathesis >/dev/null || { echo "fuzz_serve.sh needs schemathesis: pip install schemathesis" >&2; exit 2; }
OUT=$(realpath -m "${OUT:-$(mktemp -d /tmp/fuzz_serve.XXXXXX)}")
CHECKS=${CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance}
mkdir -p "$OUT"

if [ -z "${URL:-}" ]; then
  PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  URL=http://127.0.0.1:$PORT
  OMP_NUM_THREADS=1 dgemma serve --port "$PORT" --max-batch 16 --max-queue 256 >"$OUT/server.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 120); do
    curl -sf "$URL/health" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { echo "server died:"; tail -20 "$OUT/server.log"; exit 2; }
    sleep 1
  done
fi

cat >"$OUT/hooks.py" <<'EOF'
import os
import schemathesis

CAPS = {"max_denoising_steps": (4, 1024), "max_tokens": (64, 4064), "max_completion_tokens": (64, 4064),
        "n": (4, 128)}
UNSUPPORTED = ("functions", "function_call", "best_of", "suffix")

@schemathesis.hook
def map_case(ctx, case):
    body = case.body
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):      # else every generated request is a 404 model_not_found
            body["model"] = os.environ.get("MODEL", "dgemma-default")
        for k, (cap, top) in CAPS.items():
            v = body.get(k)
            if type(v) is int and cap < v <= top:
                body[k] = cap
        if case.meta is not None and case.meta.generation.mode.value == "positive":
            for k in UNSUPPORTED:                   # schema-valid but refused (400): reach the engine instead
                body.pop(k, None)
            if body.get("tools"):                   # the shipped model cannot take tools: not shown to it
                body["tool_choice"] = "none"
            if body.get("prompt") == "":            # the schema allows it, the server refuses it
                body["prompt"] = "Once upon a time"
        p = body.get("prompt")
        if isinstance(p, list) and p and not isinstance(p[0], int):
            body["prompt"] = p[:2]                  # a batch: at most 2 prompts (each up to max_tokens)
    return case
EOF

AUTH=(); [ -n "${API_KEY:-}" ] && AUTH=(-H "Authorization: Bearer $API_KEY")
set +e                                              # run in $OUT: schemathesis leaves a .schemathesis/ cache
(cd "$OUT" && SCHEMATHESIS_HOOKS="$OUT/hooks.py" timeout "${MAX_TIME:-240}" schemathesis run "$URL/openapi.json" "${AUTH[@]}" \
  --checks "$CHECKS" --max-examples "${EXAMPLES:-30}" --workers 1 --continue-on-failure \
  --request-timeout "${REQ_TIMEOUT:-60}" --no-color --report ndjson --report-dir "$OUT" >"$OUT/schemathesis.txt" 2>&1)
ST_RC=$?
set -e
sed -n '/SUMMARY/,$p' "$OUT/schemathesis.txt"
[ $ST_RC = 124 ] && echo "schemathesis did not finish within MAX_TIME=${MAX_TIME:-240}s (a hang?); see $OUT/schemathesis.txt"

# Gate on 5xx and on request errors (a timeout = a hang); everything else is informational.
RC=0
python - "$OUT"/ndjson-*.ndjson <<'EOF' || RC=$?
import collections, json, sys
kinds, bad, errors, codes = {}, [], [], collections.Counter()
for line in open(sys.argv[1]):
    ev = json.loads(line)
    if "NonFatalError" in ev:
        e = ev["NonFatalError"]
        errors.append(f"{e.get('label')}: {json.dumps(e.get('info', e))[:400]}")
    rec = ev.get("ScenarioFinished", {}).get("recorder", {})
    for i in rec.get("interactions", {}).values():
        codes[(i["request"]["method"], (i.get("response") or {}).get("status_code"))] += 1
    for cid, checks in rec.get("checks", {}).items():
        for c in checks:
            if c["status"] != "failure":
                continue
            f = c["failure_info"]["failure"]
            kinds.setdefault((c["name"], f["operation"], f["title"]), (f["message"].splitlines() or [""])[0])
            if c["name"] == "not_a_server_error":
                case = rec["cases"][cid]["value"]
                req = rec.get("interactions", {}).get(cid, {}).get("request", {})
                bad.append(f"{case['method']} {req.get('uri', case['path'])} body={json.dumps(case.get('body'))}")
print("== fuzz_serve summary ==")
print("  responses:", ", ".join(f"{m} {c}: {n}" for (m, c), n in sorted(codes.items(), key=str)))
for (name, op, title), first in sorted(kinds.items()):
    print(f"  {name:28s} {op:32s} {title} ({first})")
for b in bad:
    print("  5xx:", b)
for e in errors:
    print("  ERROR:", e)
failed = bool(bad or errors)
print("RESULT:", "FAIL (5xx or request errors/timeouts)" if failed else "OK (no 5xx, no hangs)")
sys.exit(1 if failed else 0)
EOF
[ $ST_RC = 124 ] && RC=1
echo "schemathesis exit $ST_RC; full output and reports in $OUT"
exit $RC
