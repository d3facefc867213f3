#!/usr/bin/env bash
# The planner against the runtime: each configuration of tools/plan/configs goes through
# ecss-plan --json and ecss-bench step --json (the same model, hardware and workload files, the
# simulated device in timed mode), and the table compares the predicted memory per tier with
# the runtime's accounting (the device memory the session holds, its pinned and host
# allocators' peaks) and the predicted step time with the measured one. Exits 1 when a tier
# differs by more than 1% or a step time by more than 5%.
#   scripts/plan-vs-run.sh [HARDWARE.json] [--dir DIR] [--rounds N]
# Without a hardware file it calibrates this machine (ecss-plan --calibrate) between the runs,
# and predicts each run from the calibrations right before and right after it (the mean of the
# two predictions), so that the prediction sees the machine the run saw (on the development VM
# the host optimizer's speed drifted by up to half between minutes while host states lived on
# 4 KiB pages; on huge pages the calibrations of a quiet run agree within a few percent). The table shows how
# far the two predictions lie apart (the drift column): a difference well inside it is the
# machine's, not the model's.
# Each round runs every configuration once (default 3 rounds); a configuration's step-time
# difference is the median of its rounds' (each round's prediction against that round's run),
# its memory the worst round's. DIR holds the NVMe configurations' stores (default: a scratch
# directory under /tmp). Needs a release build (build/release) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=build/release
hardware=""
dir=""
rounds=3
while (($#)); do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    *) hardware="$1"; shift ;;
  esac
done
work=$(mktemp -d /tmp/ecss-plan-vs-run.XXXXXX)
trap 'rm -rf "$work"' EXIT
dir=${dir:-$work}
calibrate=0
if [ -z "$hardware" ]; then calibrate=1; fi
configs=(
  "small ecss-host"
  "deep ecss-host-tight"
  "small no-overlap-host"
  "uneven zero-offload-host"
  "small ecss-nvme-states"
  "deep ecss-nvme-all-2mb"
)
# The hardware file the next prediction uses: a new calibration, or the one given.
calibrations=0
measure() {
  if [ "$calibrate" = 1 ]; then
    calibrations=$((calibrations + 1))
    hardware="$work/this-machine.$calibrations.json"
    "$bin/tools/plan/ecss-plan" --calibrate "$hardware" --dir "$dir" > /dev/null
  fi
}
plan() {  # CONFIG-FILES... OUT
  "$bin/tools/plan/ecss-plan" "${@:1:$#-1}" --hardware "$hardware" --json > "${@: -1}"
}
measure
for ((round = 0; round < rounds; ++round)); do
  for config in "${configs[@]}"; do
    read -r model workload <<< "$config"
    files=(--model "tools/plan/configs/$model.model.json"
           --workload "tools/plan/configs/$workload.workload.json")
    out="$work/$model.$workload.$round"
    plan "${files[@]}" "$out.before.plan.json"
    "$bin/bench/ecss-bench" step "${files[@]}" --hardware "$hardware" --steps 23 --warmup 3 \
      --dir "$dir" --json > "$out.run.json"
    measure
    plan "${files[@]}" "$out.after.plan.json"
  done
done
python3 - "$work" "$rounds" "${configs[@]}" <<'PY'
import json, statistics, sys
work, rounds, configs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
worst_memory, worst_time = 0.0, 0.0
print(f"{'config':34s} {'tier':7s} {'planned':>14s} {'measured':>14s} {'diff':>8s}")
rows = []
for config in configs:
    model, workload = config.split()
    runs = []
    for r in range(rounds):
        prefix = f"{work}/{model}.{workload}.{r}"
        plans = [json.load(open(f"{prefix}.{when}.plan.json"))["strategies"][0]
                 for when in ("before", "after")]
        run = json.load(open(f"{prefix}.run.json"))
        for p in plans:
            assert p["strategy"] == run["strategy"], (p["strategy"], run["strategy"])
        runs.append((plans, run))
    for tier in ("device", "pinned", "host", "heap"):
        worst = (0.0, 0, 0)
        for plans, run in runs:
            for p in plans:
                a, b = p["memory"][f"{tier}_bytes"], run["memory"][f"{tier}_bytes"]
                diff = abs(a - b) / b if b else (0.0 if a == 0 else 1.0)
                worst = max(worst, (diff, a, b))
        worst_memory = max(worst_memory, worst[0])
        print(f"{model + ' ' + workload:34s} {tier:7s} {worst[1]:14d} {worst[2]:14d} {100 * worst[0]:7.2f}%")
    rows.append((config, runs))
print()
print(f"{'config':34s} {'planned s':>10s} {'measured s':>11s} {'diff':>8s} {'drift':>7s}  "
      "rounds' diffs (drift); bottleneck (planned / measured)")
def predicted(plans):  # the mean of the predictions from the calibrations around the run
    return sum(p["step_seconds"] for p in plans) / len(plans)
for config, runs in rows:
    diffs = [(predicted(plans) - run["step_seconds"]) / run["step_seconds"] for plans, run in runs]
    # How far apart the predictions from before and after the run lie, against the run.
    drifts = [abs(plans[1]["step_seconds"] - plans[0]["step_seconds"]) / run["step_seconds"]
              for plans, run in runs]
    diff = statistics.median(diffs)
    worst_time = max(worst_time, abs(diff))
    planned = statistics.median(predicted(plans) for plans, _ in runs)
    measured = statistics.median(run["step_seconds"] for _, run in runs)
    each = " ".join(f"{100 * d:+.1f}% ({100 * w:.0f}%)" for d, w in zip(diffs, drifts))
    plans, run = runs[0]
    print(f"{config:34s} {planned:10.4f} {measured:11.4f} {100 * diff:+7.1f}% "
          f"{100 * statistics.median(drifts):6.1f}%  {each}; "
          f"{plans[0]['bottleneck']} / {run['bottleneck']}")
print(f"\nworst memory difference {100 * worst_memory:.2f}% (limit 1%), worst median step-time "
      f"difference {100 * worst_time:.1f}% (limit 5%) over {rounds} round(s)")
sys.exit(1 if worst_memory > 0.01 or worst_time > 0.05 else 0)
PY
