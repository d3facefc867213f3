#!/usr/bin/env python3
# plan-vs-run's table (scripts/plan-vs-run.sh says what each column means): the rounds'
# predictions and runs in WORK, read as plan-vs-run writes them, against each other.
#   scripts/plan_vs_run_table.py WORK ROUNDS "MODEL WORKLOAD"...
# Prints the memory table and the step-time table; exits 1 when a tier differs by more than 1%
# or a configuration's median step-time difference is above 5%, else 0.
# WORK/MODEL.WORKLOAD.R.run.json and .alone.K.{plan,at-run-speed.plan}.json for each round R and
# each hardware file K that predicted it: ecss-bench step --json's and ecss-plan --json's (their
# first strategy). A round's prediction is the median of its files' (the mean of the middle two
# for an even count), each figure's own.
import collections
import glob
import json
import math
import statistics
import sys

MEMORY_LIMIT = 0.01
TIME_LIMIT = 0.05
TIERS = ("device", "pinned", "host", "heap")

# One round of a configuration: its prediction (the median of the hardware files'), each file's
# alone, the run, and the same at the run's optimizer busy time (each strategy's figures).
Round = collections.namedtuple("Round", "plan alone run at_run at_runs")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def busy_of(x):  # a plan's or a run's optimizer busy time per step
    return x["resources"]["optimizer"]["busy_seconds_per_step"]


def median_of(plans):
    """The round's prediction from its hardware files' each alone: the median step, begin and
    optimizer busy time, each on its own, and the bottleneck of the plan whose step is nearest
    the median step."""
    step = statistics.median(p["step_seconds"] for p in plans)
    return {"strategy": plans[0]["strategy"], "step_seconds": step,
            "begin_seconds_per_step": statistics.median(p["begin_seconds_per_step"] for p in plans),
            "resources": {"optimizer": {"busy_seconds_per_step":
                                        statistics.median(busy_of(p) for p in plans)}},
            "bottleneck": min(plans, key=lambda p: abs(p["step_seconds"] - step))["bottleneck"]}


def load_rounds(work, model, workload, rounds):
    runs = []
    for r in range(rounds):
        prefix = f"{work}/{model}.{workload}.{r}"
        files = sorted(glob.glob(f"{prefix}.alone.*.plan.json"))
        files = [f for f in files if not f.endswith(".at-run-speed.plan.json")]
        if not files:
            raise ValueError(f"{prefix}: no prediction ({prefix}.alone.K.plan.json)")
        alone = [read_json(f)["strategies"][0] for f in files]
        at_runs = [read_json(f[:-len(".plan.json")] + ".at-run-speed.plan.json")["strategies"][0]
                   for f in files]
        one = Round(plan=median_of(alone), alone=alone, run=read_json(f"{prefix}.run.json"),
                    at_run=median_of(at_runs), at_runs=at_runs)
        for p in alone + at_runs:
            if p["strategy"] != one.run["strategy"]:
                raise ValueError(f"{prefix}: a plan of {p['strategy']} against a run of "
                                 f"{one.run['strategy']}")
        runs.append(one)
    return runs


def median_in(values):
    """(low, high, confidence): the order statistics k and n + 1 - k that bound the median,
    k the largest with 2 P(Binomial(n, 1/2) < k) <= 0.1 (every value's range below 5)."""
    n, ranked = len(values), sorted(values)
    below = lambda k: sum(math.comb(n, i) for i in range(k)) / 2 ** n  # P(Bin(n, 1/2) < k)
    k = max([k for k in range(1, n // 2 + 1) if 2 * below(k) <= 0.1], default=1)
    return ranked[k - 1], ranked[n - k], 1 - 2 * below(k)


def diff_of(planned, measured):  # nan where the run measured none (no optimizer busy time)
    return (planned - measured) / measured if measured > 0 else float("nan")


def memory_table(rows, out):
    """Each configuration's worst round per tier; returns the worst difference."""
    worst_memory = 0.0
    print(f"{'config':34s} {'tier':7s} {'planned':>14s} {'measured':>14s} {'diff':>8s}", file=out)
    for config, runs in rows:
        for tier in TIERS:
            worst = (0.0, 0, 0)
            for one in runs:
                for p in one.alone:
                    a, b = p["memory"][f"{tier}_bytes"], one.run["memory"][f"{tier}_bytes"]
                    diff = abs(a - b) / b if b else (0.0 if a == 0 else 1.0)
                    worst = max(worst, (diff, a, b))
            worst_memory = max(worst_memory, worst[0])
            print(f"{config:34s} {tier:7s} {worst[1]:14d} {worst[2]:14d} {100 * worst[0]:7.2f}%",
                  file=out)
    return worst_memory


def time_table(rows, out):
    """Each configuration's median step-time difference and its columns; returns the worst."""
    worst_time = 0.0
    print(f"{'config':34s} {'planned s':>10s} {'measured s':>11s} {'diff':>8s} {'median in':>16s} "
          f"{'drift':>7s} {'opt busy':>9s} {'at run':>8s}  "
          "rounds' diffs (drift); bottleneck, step's begin in ms (planned / measured)", file=out)
    any_circular, confidences = False, set()
    for config, runs in rows:
        # Divided directly: a run of no step time fails loudly rather than becoming nan.
        diffs = [(one.plan["step_seconds"] - one.run["step_seconds"]) / one.run["step_seconds"]
                 for one in runs]
        # How far apart the predictions of the nearest calibrations, each alone, lie, against
        # the run.
        drifts = [(max(p["step_seconds"] for p in one.alone) -
                   min(p["step_seconds"] for p in one.alone)) / one.run["step_seconds"]
                  for one in runs]
        # The optimizer's planned busy time against the run's, and the step time planned at
        # the run's optimizer speed against the run's.
        busy = statistics.median(diff_of(busy_of(one.plan), busy_of(one.run)) for one in runs)
        at_run = statistics.median(diff_of(one.at_run["step_seconds"], one.run["step_seconds"])
                                   for one in runs)
        # Circular where every round's plans at the run's busy time are that busy time (to 1%).
        circular = all(p["step_seconds"] <= 1.01 * busy_of(p) for one in runs for p in one.at_runs)
        any_circular |= circular
        diff = statistics.median(diffs)
        low, high, confidence = median_in(diffs)
        confidences.add(round(100 * confidence))
        worst_time = max(worst_time, abs(diff))
        planned = statistics.median(one.plan["step_seconds"] for one in runs)
        measured = statistics.median(one.run["step_seconds"] for one in runs)
        each = " ".join(f"{100 * d:+.1f}% ({100 * w:.0f}%)" for d, w in zip(diffs, drifts))
        first = runs[0]
        begins = [1e3 * statistics.median(side) for side in (
            [one.plan["begin_seconds_per_step"] for one in runs],
            [one.run["begin_seconds_per_step"] for one in runs])]
        interval = f"{100 * low:+.1f}..{100 * high:+.1f}%"
        print(f"{config:34s} {planned:10.4f} {measured:11.4f} {100 * diff:+7.1f}% {interval:>16s} "
              f"{100 * statistics.median(drifts):6.1f}% {100 * busy:+8.1f}% {100 * at_run:+6.1f}%"
              f"{'*' if circular else ' '}  "
              f"{each}; {first.plan['bottleneck']} / {first.run['bottleneck']}, "
              f"{begins[0]:.2f} / {begins[1]:.2f}", file=out)
    if any_circular:
        print("* at run is circular: the plan's step is its optimizer's busy time (see the header)",
              file=out)
    print(f"median in: the rounds' differences that bound the median with "
          f"{', '.join(f'{c}%' for c in sorted(confidences))} confidence (see the header)",
          file=out)
    return worst_time


def main(argv, out=sys.stdout):
    work, rounds, configs = argv[0], int(argv[1]), argv[2:]
    rows = [(config, load_rounds(work, *config.split(), rounds)) for config in configs]
    worst_memory = memory_table(rows, out)
    print(file=out)
    worst_time = time_table(rows, out)
    print(f"\nworst memory difference {100 * worst_memory:.2f}% (limit 1%), worst median step-time "
          f"difference {100 * worst_time:.1f}% (limit 5%) over {rounds} round(s)", file=out)
    return 1 if worst_memory > MEMORY_LIMIT or worst_time > TIME_LIMIT else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
