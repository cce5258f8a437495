#!/bin/bash
# `trident serve` in fixed and --adaptive mode under the same `trident bench serve` load, one server at a time (on a
# small CPU the load generator shares the cores). Each NAME runs one server: names starting with "fixed" plain,
# "adaptive" with --adaptive; results in /tmp/adaptive-ab-NAME.{log,json,png} and its adaptive metrics in
# /tmp/adaptive-ab-NAME.metrics (docs/benchmarks.md, "trident serve --adaptive against fixed settings").
#   RATE=0.4 SLO=50 scripts/adaptive_ab.sh fixed_a adaptive_a adaptive_b fixed_b
set -u
cd "$(dirname "$0")/.."
RATE=${RATE:-0.8} SLO=${SLO:-80} PROMPTS=${PROMPTS:-40} PORT=${PORT:-8031}
run() {  # name, extra serve flags
  .venv/bin/trident serve --port "$PORT" --max-num-seqs 32 --log-level warning $2 > "/tmp/adaptive-ab-$1.server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 60); do curl -s "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
  .venv/bin/trident bench serve --base-url "http://127.0.0.1:$PORT/v1" --num-prompts "$PROMPTS" --request-rate "$RATE" \
      --seed 0 --input-len-mean 128 --output-len-mean 64 --slo-tpot-ms "$SLO" --slo-ttft-ms 4000 \
      --json "/tmp/adaptive-ab-$1.json" --plot "/tmp/adaptive-ab-$1.png" > "/tmp/adaptive-ab-$1.log" 2>&1
  curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^trident_adaptive" > "/tmp/adaptive-ab-$1.metrics"
  kill $pid; wait $pid 2> /dev/null
  grep -E "TTFT|TPOT|ITL|goodput \(" "/tmp/adaptive-ab-$1.log" | sed "s/^/$1 /"
}
for name in "$@"; do
  case $name in
    fixed*) run "$name" "" ;;
    adaptive*) run "$name" "--adaptive --slo-tpot-ms $SLO" ;;
    *) echo "$name: a name starts with fixed or adaptive" >&2; exit 2 ;;
  esac
done
