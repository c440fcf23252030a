#!/bin/bash
# c=1: tandem-speed vs primary through an orchestrator with the payoff (50050, tandem serve's) and one without (50060),
# both on the same model services; invocations alternate A B B A.
cd /work/main
while [ ! -f /tmp/tandem.json ]; do sleep 5; done
P=$(jq -r .primary /tmp/tandem.json); S=$(jq -r .secondary /tmp/tandem.json)
.venv/bin/python -m orchestrator --host 127.0.0.1 --port 50060 --metrics-port 9360 --max-len 256 --max-running 16 --max-queued 64 --queue-timeout-s 300 --primary $P --secondary $S --no-payoff > /tmp/exp/payoff/orch_nopayoff.log 2>&1 &
OPID=$!
sleep 15
run() { # port tag
  M=http://127.0.0.1:$( [ $1 = 50050 ] && jq -r .metrics.orchestrator /tmp/tandem.json | sed 's|.*:||;s|/metrics||' || echo 9360 )/metrics
  RAY_AUTH_MODE=disabled .venv/bin/tandem loadtest --target 127.0.0.1:$1 --metrics-url $M --prompts bench/prompts.jsonl --num-requests 32 --max-tokens 64 --sweep 1 --repeats 2 --mode primary,tandem-speed --json /tmp/exp/payoff/$2.json --markdown /tmp/exp/payoff/$2.md > /tmp/exp/payoff/$2.log 2>&1
  echo "$2 rc=$? $(date +%T)"
}
date +%T
run 50050 payoff_1
run 50060 nopayoff_1
run 50060 nopayoff_2
run 50050 payoff_2
curl -s $(jq -r .metrics.orchestrator /tmp/tandem.json) | grep -E '^tandem_(payoff|speculation_skipped|spec_num_drafts_total)' > /tmp/exp/payoff/payoff_metrics.txt
kill $OPID
