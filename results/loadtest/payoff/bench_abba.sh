#!/bin/bash
# Per-request interleaved primary / tandem-speed at batch 1 (tandem bench --via grpc) against the payoff orchestrator
# (50050) and a --no-payoff one (50060) on the same model services, alternating A B B A.
cd /work/main
P=$(jq -r .primary /tmp/tandem.json); S=$(jq -r .secondary /tmp/tandem.json)
.venv/bin/python -m orchestrator --host 127.0.0.1 --port 50060 --metrics-port 9360 --max-len 256 --primary $P --secondary $S --no-payoff > /tmp/exp/payoff/orch_nopayoff_b.log 2>&1 &
OPID=$!
sleep 15
b() { .venv/bin/tandem bench --prompts bench/prompts.jsonl --max-tokens 64 --modes primary,tandem-speed --via grpc --target 127.0.0.1:$1 --no-block-cost --repeats 3 --json /tmp/exp/payoff/$2.json --markdown /tmp/exp/payoff/$2.md > /tmp/exp/payoff/$2.log 2>&1; echo "$2 rc=$? $(date +%T)"; grep '^| \(primary\|tandem-speed\) | grpc' /tmp/exp/payoff/$2.md | head -2; }
b 50050 bpayoff_1
b 50060 bnopayoff_1
b 50060 bnopayoff_2
b 50050 bpayoff_2
kill $OPID
