#!/usr/bin/env bash
# The planner against the runtime: each configuration of tools/plan/configs goes through ecss-plan
# --json and ecss-bench step --json (the same model, hardware and workload files, the simulated
# device in timed mode), and the table compares the predicted memory per tier with the runtime's
# accounting (the device memory the session holds, its pinned and host allocators' peaks) and the
# predicted step time with the measured one. Exits 1 when a tier differs by more than 1% or a step
# time by more than 5%.
#   scripts/plan-vs-run.sh [HARDWARE.json] [--dir DIR] [--rounds N] [--steps N] [--keep]
# Without a hardware file it calibrates this machine (ecss-plan --calibrate) before the first round
# and after each, and predicts each round's runs from the calibrations nearest it, up to three
# before and three after (fewer for the rounds at either end): the median of their predictions, each
# from one calibration's file whole, so that the prediction follows the machine's drift over half an
# hour without taking on one calibration's noise. Not a file of each figure's median: calibration
# fits some figures together (the NVMe pipeline's session fraction and per-update overhead, the
# step's begin per op and per token, the gradient additions alone and beside the optimizer), one
# trading against another, and a file that takes each from another calibration describes a drive or
# a host that none measured (on 2026-12-05 such files planned the NVMe configurations 6.5-11.4%
# short in two 8-round runs, where the median of the calibrations' own predictions of the same
# rounds was -5.2% to +1.9%). Once a round, not once a run: on 2026-12-05 this VM's
# optimizer speed moved in phases of seconds (one run's 40-step chunks at 0.89-1.28 G/s, another's
# at 1.33-1.39), and a one-thread reference run just before and just after each of 12 runs of small
# ecss-host predicted its rate no better than nothing (the run's rate over the pair's mean strayed
# from its median by 10.9%, the rate alone by 10.7%): a calibration's nearness buys nothing there,
# and rounds buy a median. On the development VM the host optimizer's speed drifted by up to half
# between minutes while host states lived on 4 KiB pages; on huge pages (2026-12-03, --dir /tmp)
# five calibrations back to back measured one optimizer thread at 1.32-1.70 G/s over 24 steps
# (1.59-1.73 over the 96 --calibrate now runs; 8 domains then) and NVMe reads at 6.4-12.7 GB/s. The
# drift column is how far the predictions of those calibrations, each alone, lie apart: wider than
# the error of their median, but a difference well inside it is still more likely the machine's than
# the model's. "median in": the rounds' differences that bound their median with 90% confidence or
# more (order statistics k and n + 1 - k, k the largest with 2 P(Binomial(n, 1/2) < k) <= 0.1),
# assuming only that the rounds are independent draws; fewer than 5 rounds cannot give 90%, and then
# it is every round's range and its confidence (75% for 3 rounds). A limit inside it is not yet told
# apart from the machine's noise. The next two columns split a difference in two. "opt busy": the
# optimizer's planned busy time per step against the run's (planned: the union of its CPU updates
# and its states' reads and writes on the drives, the median of the nearest calibrations', not the
# weights' stages, which the stager reads beside them; measured: its updates' spans). "at run": the
# step time planned from each of those files with the optimizer's CPU rates and the drives' read
# and write rates scaled by its planned over the run's measured busy time (once, not iterated; the
# other figures as they are; the stages' reads too, at the drives' scaled rate), their median
# against the run's: the difference the rest of the model adds once the optimizer's busy time is
# the run's. It is circular where the plan's step is its optimizer's busy time (marked *: then it is
# the run's own step against its optimizer's busy time, and says only whether the run too was bound
# by the optimizer), and it cannot show an error in the optimizer's own model, which goes into the
# scale. On 2026-12-05 the per-round busy ratios were -21% to +20% with host states and -28% to +42%
# with NVMe ones. Both columns are medians of the rounds; the exit code reads only the memory table
# and the "diff" column. The bench runs the steps the planner simulates (4 to warm up, then the
# workload's `steps`, with the same sampled routing), so that both describe the same steps; --steps
# sets them (default 60: a second or more of each run, where 20-step runs of one configuration back
# to back spread twice as wide). Each round runs every configuration once (default 16 rounds, about
# 71 minutes calibrated, then 15-20 of predictions: on the development VM the 90% intervals of the
# last 8-round run's medians spanned 7-24 points, every run of 3-12 rounds since 2026-12-04 exited
# 1, and the first of 16 exited 0, on 2026-12-07); a configuration's step-time difference is the
# median of its rounds' (each round's prediction against that round's run), its memory the worst
# round's. DIR holds the NVMe configurations' stores (default: a scratch directory under /tmp).
# --keep leaves the scratch directory (every run's, calibration's and prediction's JSON) in place
# and prints its path. The table is scripts/plan_vs_run_table.py's (tested on rounds written by
# tests/plan/plan_vs_run_table_test.py). Needs a release build (build/release, or the build
# directory in ECSS_BUILD_DIR) and python3. Bad arguments, a missing directory and a hardware file
# that ecss-plan refuses are refused with exit 2 before anything runs.
set -euo pipefail
# One group, parsed before any of it runs: the file edited during a run (a run takes about 90
# minutes) leaves the run as it started.
{
bin=$(realpath -m "${ECSS_BUILD_DIR:-$(dirname "$0")/../build/release}")
hardware=""
dir=""
rounds=16
steps=60
keep=0
refuse() {  # MESSAGE: bad arguments, before anything runs
  echo "plan-vs-run: $1" >&2
  exit 2
}
while (($#)); do
  case "$1" in
    --dir | --rounds | --steps)
      if (($# < 2)); then refuse "$1: needs a value"; fi
      case "$1" in
        --dir) dir="$2" ;;
        --rounds) rounds="$2" ;;
        --steps) steps="$2" ;;
      esac
      shift 2 ;;
    --keep) keep=1; shift ;;
    -*) refuse "unknown option $1" ;;
    *)
      if [ -n "$hardware" ]; then refuse "$1: a second hardware file (one at most)"; fi
      if ! [ -f "$1" ] || ! [ -r "$1" ]; then refuse "$1: no such readable hardware file"; fi
      hardware=$(realpath "$1")
      shift ;;
  esac
done
count() {  # NAME MAX [WHAT]: the variable NAME as a decimal count 1..MAX, else refused
  local value=${!1}
  if ! [[ "$value" =~ ^[0-9]+$ ]] || ((10#$value < 1 || 10#$value > $2)); then
    refuse "--$1 $value: must be 1 to $2${3:+ ($3)}"
  fi
  printf -v "$1" '%d' "$((10#$value))"
}
count steps 1000 "the workload's steps"
count rounds 100
if [ -n "$dir" ]; then
  if ! [ -d "$dir" ]; then refuse "--dir $dir: no such directory"; fi
  dir=$(realpath "$dir")
fi
cd "$(dirname "$0")/.."  # paths given are the caller's: resolved above
need() {  # TOOL: refused when this build has no TOOL
  if ! [ -x "$bin/$1" ]; then
    refuse "no $bin/$1: build the release preset first, or set ECSS_BUILD_DIR"
  fi
}
need tools/plan/ecss-plan
if [ -n "$hardware" ]; then  # read as the predictions will read it (exit 2: refused), first
  checked=0
  refused=$("$bin/tools/plan/ecss-plan" --model tools/plan/configs/small.model.json \
    --hardware "$hardware" --json 2>&1 > /dev/null) || checked=$?
  if [ "$checked" = 2 ]; then refuse "$refused"; fi
fi
need bench/ecss-bench
work=$(mktemp -d /tmp/ecss-plan-vs-run.XXXXXX)
if [ "$keep" = 1 ]; then
  echo "plan-vs-run: keeping $work" >&2
else
  trap 'rm -rf "$work"' EXIT
fi
dir=${dir:-$work}
# The table's code as it is now, like the rest of this file (parsed before the run).
cp scripts/plan_vs_run_table.py "$work/"
calibrate=0
if [ -z "$hardware" ]; then calibrate=1; fi
# Model and workload. Every model's experts have 1 Mi parameters but wide's, 16 Mi (the presets':
# 21-210 M), with states on NVMe, where an expert's size sets the length of its transfers.
# ecss-host-4x32k's steps are 4 micro-batches of 32,768 tokens: the host's gradient additions
# and the routing of many tokens at a step's begin.
configs=(
  "small ecss-host"
  "small ecss-host-4x32k"
  "deep ecss-host-tight"
  "small no-overlap-host"
  "uneven zero-offload-host"
  "small ecss-nvme-states"
  "deep ecss-nvme-all-2mb"
  "wide ecss-nvme-states-1gib"
)
# The calibrations, numbered from 1 (none with a hardware file given).
calibrations=0
calibrate_now() {
  if [ "$calibrate" = 1 ]; then
    calibrations=$((calibrations + 1))
    "$bin/tools/plan/ecss-plan" --calibrate "$work/this-machine.$calibrations.json" \
      --dir "$dir" > /dev/null
  fi
}
# Each workload with the steps to measure.
for config in "${configs[@]}"; do
  read -r _ workload <<< "$config"
  python3 -c 'import json, sys; w = json.load(open(sys.argv[1])); w["steps"] = int(sys.argv[2]);
json.dump(w, open(sys.argv[3], "w"))' "tools/plan/configs/$workload.workload.json" "$steps" \
    "$work/$workload.workload.json"
done
files_of() {  # MODEL WORKLOAD: the planner's and the bench's options for them, in `files`
  files=(--model "tools/plan/configs/$1.model.json" --workload "$work/$2.workload.json")
}
calibrate_now
for ((round = 0; round < rounds; ++round)); do
  for config in "${configs[@]}"; do
    read -r model workload <<< "$config"
    out="$work/$model.$workload.$round"
    # The device's figures are every calibration's (the base file's): any one does for the bench.
    files_of "$model" "$workload"
    "$bin/bench/ecss-bench" step "${files[@]}" \
      --hardware "${hardware:-$work/this-machine.$calibrations.json}" --dir "$dir" --json \
      > "$out.run.json"
    echo "$calibrations" > "$out.calibration"  # the last one before the run
  done
  calibrate_now
done
# The predictions, once every calibration is in: each hardware file whole, and the same file at
# the run's optimizer busy time (the "at run" column, above), of the workload's strategy alone
# (the table reads no other). A hardware file given is file 0.
if [ "$calibrate" = 0 ]; then cp "$hardware" "$work/this-machine.0.json"; fi
for ((round = 0; round < rounds; ++round)); do
  for config in "${configs[@]}"; do
    read -r model workload <<< "$config"
    out="$work/$model.$workload.$round"
    files_of "$model" "$workload"
    if [ "$calibrate" = 1 ]; then
      before=$(cat "$out.calibration")
      nearest=()
      for ((k = before - 2; k <= before + 3; ++k)); do
        if ((k >= 1 && k <= calibrations)); then nearest+=("$k"); fi
      done
    else
      nearest=(0)  # the hardware file given
    fi
    for k in "${nearest[@]}"; do
      "$bin/tools/plan/ecss-plan" "${files[@]}" --hardware "$work/this-machine.$k.json" \
        --only-workload-strategy --json > "$out.alone.$k.plan.json"
      python3 - "$work/this-machine.$k.json" "$out.alone.$k.plan.json" "$out.run.json" \
        "$out.alone.$k.at-run-speed.json" <<'PY'
import json, sys
hardware, plan, run = (json.load(open(f)) for f in sys.argv[1:4])
planned = plan["strategies"][0]["resources"]["optimizer"]["busy_seconds_per_step"]
measured = run["resources"]["optimizer"]["busy_seconds_per_step"]
host = hardware.get("host", {})
scale = planned / measured if planned > 0 and measured > 0 else 1.0
for key in ("optimizer_params_per_s_by_threads", "optimizer_params_per_s_per_thread"):
    if isinstance(host.get(key), list):
        host[key] = [rate * scale for rate in host[key]]
    elif key in host:
        host[key] *= scale
for key in ("read_gbps", "write_gbps"):
    if key in hardware.get("nvme", {}):
        hardware["nvme"][key] *= scale
hardware["name"] = hardware.get("name", "hardware") + " at the run's optimizer busy time"
json.dump(hardware, open(sys.argv[4], "w"))
PY
      "$bin/tools/plan/ecss-plan" "${files[@]}" --hardware "$out.alone.$k.at-run-speed.json" \
        --only-workload-strategy --json > "$out.alone.$k.at-run-speed.plan.json"
    done
  done
done
python3 "$work/plan_vs_run_table.py" "$work" "$rounds" "${configs[@]}"
exit
}
