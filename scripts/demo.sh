#!/usr/bin/env bash
# demo.sh: the README's demo command (`make demo`). Sets up and builds if needed, starts a
# router, one prefill worker and one decode worker on this machine (free ports, KV over UCX on
# loopback TCP), waits until the router can serve, generates from a few real prompts through
# the `ferry` CLI (the client SDK), prints the text and per request TTFT, tokens/s and KV raw
# vs wire bytes, then stops everything (also on Ctrl-C or an error).
#
#   scripts/demo.sh                      the ferry policy at b = 0.5, then FP16 for comparison
#   FERRY_DEMO_POLICY=fp16 scripts/demo.sh   one policy only (a built-in name)
#   FERRY_DEMO_BUDGET=0.25 ...               its budget (0 = the policy's own)
#   FERRY_DEMO_KEEP=1 ...                    leave the logs in place (their folder is printed)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
[ -f build/build.ninja ] || meson setup build
ninja -C build

model=models/SmolLM2-135M-Instruct.Q4_1.gguf
bin=build
policy=${FERRY_DEMO_POLICY:-ferry}
budget=${FERRY_DEMO_BUDGET:-0.5}
# KV crosses loopback TCP as it would cross a network (UCX would otherwise pick shared memory).
export UCX_TLS=${UCX_TLS:-tcp}
prompts=(
  "What is the capital of France?"
  "Write a haiku about a ferry crossing a river at dawn."
  "Explain in two sentences why a compressed KV cache helps when the network is slow."
)

work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-demo.XXXXXX")
pids=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    echo
    echo "== stopping (SIGTERM: each daemon drains and exits) =="
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    done
  fi
  if [ "${FERRY_DEMO_KEEP:-0}" = 1 ] || [ $rc -ne 0 ]; then
    echo "logs: $work"
  else
    rm -rf "$work"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_file() { # path seconds name
  for _ in $(seq 1 $(($2 * 10))); do [ -s "$1" ] && return 0; sleep 0.1; done
  echo "demo: $3 did not start; its log:" >&2
  cat "$work/$3.log" >&2 || true
  return 1
}

echo
echo "== Ferry demo: router + prefill + decode on this machine =="
"$bin/router/ferry-router" --model "$model" --listen 127.0.0.1:0 --port-file "$work/router.port" \
  --http-listen 127.0.0.1:0 --http-port-file "$work/http.port" --model-name smollm2 \
  >"$work/router.log" 2>&1 &
pids+=($!)
wait_file "$work/router.port" 30 router
wait_file "$work/http.port" 30 router
router=127.0.0.1:$(cat "$work/router.port")
http=127.0.0.1:$(cat "$work/http.port")

decode_port=$(free_port)
kv_port=$(free_port)
"$bin/decode/ferry-decode" --model "$model" --listen "127.0.0.1:$decode_port" \
  --kv-listen "127.0.0.1:$kv_port" --router "$router" --threads 1 \
  >"$work/decode.log" 2>&1 &
pids+=($!)
"$bin/prefill/ferry-prefill" --model "$model" --listen 127.0.0.1:0 --port-file "$work/prefill.port" \
  --router "$router" --threads 1 --policy "$policy" --budget "$budget" \
  >"$work/prefill.log" 2>&1 &
pids+=($!)
echo "router $router; decode worker 127.0.0.1:$decode_port (KV on UCX $UCX_TLS port $kv_port); prefill worker"
echo -n "waiting for both workers to load the model and register"
for i in $(seq 1 600); do
  if "$bin/client/ferry" health "$router" >/dev/null 2>&1; then break; fi
  for pid in "${pids[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo; echo "demo: a daemon exited during start-up; logs:" >&2
      tail -n 20 "$work"/*.log >&2
      exit 1
    fi
  done
  [ $i = 600 ] && { echo; echo "demo: the router never became ready" >&2; exit 1; }
  [ $((i % 10)) = 0 ] && echo -n "."
  sleep 0.1
done
echo " ready: $("$bin/client/ferry" health "$router")"

# One generation: the text streams to stdout, the figures (stderr of --stats) go to a table.
summary=()
run() { # label policy budget prompt
  local label=$1 pol=$2 b=$3 prompt=$4 stats args=()
  [ "$b" != 0 ] && args=(--budget "$b")
  echo
  echo ">>> [$label] $prompt"
  # Greedy, so both policies' answers can be compared; a light repetition penalty keeps the
  # small default model out of loops ("a life-affirming, a life-affirming, ...").
  "$bin/client/ferry" generate "$router" --chat --temperature 0 --repeat-penalty 1.1 \
    --max-tokens 96 --policy "$pol" "${args[@]}" --stats "$prompt" 2>"$work/stats.txt" || true
  stats=$(cat "$work/stats.txt")
  echo "$stats" | sed 's/^/    /'
  local ttft tps raw wire ratio
  ttft=$(echo "$stats" | sed -n 's/.*TTFT \([0-9.]*\) ms.*/\1/p')
  tps=$(echo "$stats" | sed -n 's/.* \([0-9.]*\) tok\/s.*/\1/p')
  raw=$(echo "$stats" | sed -n 's/^KV \([0-9]*\) bytes raw.*/\1/p')
  wire=$(echo "$stats" | sed -n 's/.*-> \([0-9]*\) bytes wire.*/\1/p')
  ratio=$(echo "$stats" | sed -n 's/.*bytes wire (\([0-9.]*\)).*/\1/p')
  summary+=("$(printf '%-16s %-48.48s %8s %7s %9s %9s %6s' "$label" "$prompt" "${ttft:-?}" \
              "${tps:-?}" "${raw:-?}" "${wire:-?}" "${ratio:-?}")")
}

for p in "${prompts[@]}"; do
  run "$policy b=$budget" "$policy" "$budget" "$p"
done
if [ -z "${FERRY_DEMO_POLICY:-}" ]; then
  for p in "${prompts[@]}"; do
    run "fp16" "fp16" 0 "$p"
  done
fi

echo
echo "== per request (greedy, repetition penalty 1.1, 96 tokens at most, chat template) =="
printf '%-16s %-48s %8s %7s %9s %9s %6s\n' policy prompt "TTFT ms" "tok/s" "KV raw B" \
  "KV wire B" ratio
for line in "${summary[@]}"; do echo "$line"; done
# The same cluster through the OpenAI-compatible API (what the openai client or curl sends).
openai_prompt="In one sentence, what is a ferry?"
echo
echo ">>> [OpenAI API] POST http://$http/v1/chat/completions  \"$openai_prompt\""
python3 - "$http" "$openai_prompt" "$policy" "$budget" <<'PY' || echo "demo: the OpenAI API call failed" >&2
import json, sys, urllib.request
addr, prompt, policy, budget = sys.argv[1:5]
body = {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "max_tokens": 64,
        "temperature": 0, "repetition_penalty": 1.1, "kv_policy": policy}
if float(budget) > 0:
    body["kv_budget"] = float(budget)
req = urllib.request.Request("http://%s/v1/chat/completions" % addr, json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
r = json.load(urllib.request.urlopen(req, timeout=300))
f = r["ferry"]
print(r["choices"][0]["message"]["content"])
print("    usage %(prompt_tokens)d + %(completion_tokens)d tokens" % r["usage"]
      + "; KV %d bytes raw -> %d on the wire (%s), TTFT %.1f ms"
      % (f["kv_raw_bytes"], f["kv_wire_bytes"], f["kv_policy"], f["ttft_ms"]))
PY
echo
echo "router metrics: curl http://$router/metrics   (also on each worker's port)"
echo "OpenAI-compatible API: http://$http/v1   (e.g. OpenAI(base_url=..., api_key=\"unused\"))"
