#!/usr/bin/env bash
# Issue 18's acceptance: our decoder against llama.cpp (LLamaSharp 0.30.0, CPU backend) side by side on this machine,
# on the same weights: greedy gpt2-small (random weights, seed 1, tied head), 8 prompt tokens -> 64 new tokens, 2
# threads. Rounds alternate the runs (gpt f32, llama F32, gpt f16, llama F16, gpt bf16), each the median of --runs
# timed runs after a warm-up; the table gives the median over rounds and how many of the 64 greedy ids agree with
# llama F32's (the common prefix, worst round). This machine's speed drifts by tens of percent over minutes: only
# figures from the same rounds compare.
#
# Usage: bench/compare-llama.sh [ROUNDS (5)] [RUNS per measurement (3)] [WORK directory (/tmp/gpt-llama-compare)]
set -euo pipefail
rounds=${1:-5}
runs=${2:-3}
work=${3:-/tmp/gpt-llama-compare}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"

echo "building (Release)..." >&2
dotnet build "$root/src/Gpt.Cli/Gpt.Cli.csproj" -c Release -v quiet -nologo >&2
dotnet build "$root/bench/llama-compare/LlamaCompare.csproj" -c Release -v quiet -nologo >&2
gpt="$root/src/Gpt.Cli/bin/Release/net10.0/gpt"
llama="$root/bench/llama-compare/bin/Release/net10.0/LlamaCompare"

# One model for both sides: saved once, every run loads it.
if [[ ! -f "$work/model/model.safetensors" ]]; then
  "$gpt" init --config gpt2-small --seed 1 --out "$work/model" --format json >/dev/null
fi
for dtype in f32 f16; do
  if [[ ! -f "$work/model-$dtype.gguf" ]]; then
    "$gpt" bench gguf --model "$work/model" --dtype "$dtype" --out "$work/model-$dtype.gguf" --format json >/dev/null
  fi
done

# Random gpt2-small weights make a near-constant greedy sequence: the tiny Hugging Face fixture (diverse ids) checks
# the conversion too, 8 prompt tokens -> 8 new (its context is 16).
fixture="$root/tests/fixtures/tiny-gpt2"
"$gpt" bench gguf --model "$fixture" --out "$work/tiny-f32.gguf" --format json >/dev/null
tiny_gpt=$("$gpt" bench generate --model "$fixture" --new-tokens 8 --runs 1 --bandwidth-gbps 1 --format json | jq -c .ids)
tiny_llama=$("$llama" --model "$work/tiny-f32.gguf" --new-tokens 8 --runs 1 | jq -c .ids)
echo "tiny fixture greedy ids: gpt $tiny_gpt, llama.cpp $tiny_llama" >&2
[[ "$tiny_gpt" == "$tiny_llama" ]] && tiny_same=yes || tiny_same=NO

results="$work/results.jsonl"
: >"$results"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
# The memory's read bandwidth is measured once (gpt bench generate would measure it per call, adding minutes of load).
bandwidth=$("$gpt" bench machine --format json | jq '.read_bandwidth_gbps')
run_gpt() { # round label dtype
  "$gpt" bench generate --model "$work/model" --dtype "$3" --runs "$runs" --bandwidth-gbps "$bandwidth" --format json \
    | jq -c --arg side "$2" --argjson round "$1" '{round: $round, side: $side, tokens_per_s, decode_tokens_per_s, first_token_s, ids, others_cpu_pct: .machine.others_cpu_pct, load: .machine.load_average}' \
    | tee -a "$results" >&2
}
run_llama() { # round label dtype
  "$llama" --model "$work/model-$3.gguf" --runs "$runs" --threads 2 \
    | jq -c --arg side "$2" --argjson round "$1" '{round: $round, side: $side, tokens_per_s, decode_tokens_per_s, first_token_s, ids}' \
    | tee -a "$results" >&2
}
for ((round = 1; round <= rounds; round++)); do
  run_gpt "$round" "gpt f32" f32
  run_llama "$round" "llama.cpp F32" f32
  run_gpt "$round" "gpt f16" f16
  run_llama "$round" "llama.cpp F16" f16
  run_gpt "$round" "gpt bf16" bf16
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

echo "load average before: $load_before, after: $load_after; $rounds rounds, each the median of $runs runs; memory read bandwidth $bandwidth GB/s"
# Of the ceiling: decode tokens/s × bytes of weights a step reads (gpt2-small's matrices: 494,128,128 in float32,
# half that in 16 bits) / the read bandwidth.
jq -rs --argjson bandwidth "$bandwidth" '
  def median: sort | if length % 2 == 1 then .[(length - 1) / 2] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  (map(select(.side == "llama.cpp F32")) | .[0].ids) as $reference
  | group_by(.side)
  | sort_by(.[0].side as $side | ["gpt f32", "llama.cpp F32", "gpt f16", "llama.cpp F16", "gpt bf16"] | index($side))
  | (["side", "tokens/s", "decode tok/s", "of ceiling", "first token s", "rounds", "same ids as llama F32 (first N of 64, worst round)"] | @tsv),
    (.[] | [ .[0].side,
             (map(.tokens_per_s) | median | . * 10 | round / 10),
             (map(.decode_tokens_per_s) | median | . * 10 | round / 10),
             (.[0].side as $side | map(.decode_tokens_per_s) | median
              | . * (if ($side | test("32")) then 494128128 else 247064064 end) / ($bandwidth * 1e9) * 100 | round | tostring + " %"),
             (map(.first_token_s) | median | . * 10000 | round / 10000),
             length,
             (map(.ids as $ids | [range(0; 64) | select($ids[.] != $reference[.])] | first // 64) | min) ] | @tsv)
' "$results" | column -t -s $'\t'
echo "tiny fixture (tests/fixtures/tiny-gpt2), 8 greedy ids: the same on both sides: $tiny_same ($tiny_gpt)"
echo "per round: $results"
