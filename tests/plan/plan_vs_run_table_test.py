#!/usr/bin/env python3
# scripts/plan_vs_run_table.py on rounds written here: the limits it exits on, the median and
# its interval, and what it refuses.
import io
import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import plan_vs_run_table as table  # noqa: E402

MEMORY = {"device_bytes": 1000, "pinned_bytes": 2000, "host_bytes": 3000, "heap_bytes": 0}


def figures(step, busy, memory=None, strategy="ecss", bottleneck="optimizer"):
    return {"strategy": strategy, "step_seconds": step, "begin_seconds_per_step": 0.001,
            "bottleneck": bottleneck, "resources": {"optimizer": {"busy_seconds_per_step": busy}},
            "memory": dict(memory or MEMORY)}


def write_round(work, config, r, planned, measured, *, plan_memory=None, at_run=None,
                run_strategy="ecss", bottlenecks=None):
    """A round as plan-vs-run writes it: `planned` one hardware file's predicted step, or a tuple
    of them (one file each, their optimizer busy half the step); `plan_memory` the last file's
    memory (the others' MEMORY); `at_run` each file's step at the run's busy time (default the
    run's; below 0: its optimizer busy the whole step, circular)."""
    prefix = os.path.join(work, "{}.{}.{}".format(*config.split(), r))
    with open(prefix + ".run.json", "w") as f:
        json.dump(figures(measured, measured / 2, strategy=run_strategy), f)
    steps = planned if isinstance(planned, tuple) else (planned,)
    for k, step in enumerate(steps, start=1):
        memory = plan_memory if k == len(steps) else None
        bottleneck = bottlenecks[k - 1] if bottlenecks else "optimizer"
        with open(f"{prefix}.alone.{k}.plan.json", "w") as f:
            json.dump({"strategies": [figures(step, step / 2, memory, bottleneck=bottleneck)]}, f)
        with open(f"{prefix}.alone.{k}.at-run-speed.plan.json", "w") as f:
            at = at_run if at_run is not None else measured
            busy = abs(at) if at < 0 else at / 2
            json.dump({"strategies": [figures(abs(at), busy)]}, f)


class PlanVsRunTableTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.work = self.dir.name

    def tearDown(self):
        self.dir.cleanup()

    def run_table(self, rounds, configs):
        out = io.StringIO()
        code = table.main([self.work, str(rounds)] + configs, out)
        return code, out.getvalue()

    def test_exits_0_when_every_median_is_within_5_percent(self):
        # Rounds at -8% .. +8%: single rounds beyond the limit, the median (+1%) within it.
        for r, diff in enumerate([-0.08, 0.01, 0.08, -0.02, 0.03]):
            write_round(self.work, "m a", r, 0.1 * (1 + diff), 0.1)
        code, text = self.run_table(5, ["m a"])
        self.assertEqual(code, 0, text)
        self.assertIn("worst median step-time difference 1.0% (limit 5%) over 5 round(s)", text)

    def test_exits_1_when_one_configurations_median_is_above_5_percent(self):
        for r in range(5):
            write_round(self.work, "m a", r, 0.100, 0.1)
            write_round(self.work, "m b", r, 0.094, 0.1)  # planned 6% fast
        code, text = self.run_table(5, ["m a", "m b"])
        self.assertEqual(code, 1, text)
        self.assertIn("worst median step-time difference 6.0%", text)
        line = next(l for l in text.splitlines() if l.startswith("m b") and "0.0940" in l)
        self.assertIn("-6.0%", line)

    def test_the_limit_is_5_percent_either_way(self):
        for planned, code in [(0.1049, 0), (0.0951, 0), (0.1051, 1), (0.0949, 1)]:
            write_round(self.work, "m a", 0, planned, 0.1)
            self.assertEqual(self.run_table(1, ["m a"])[0], code, planned)

    def test_memory_beyond_1_percent_fails_even_in_one_round(self):
        for r in range(5):
            write_round(self.work, "m a", r, 0.1, 0.1,
                        plan_memory=dict(MEMORY, pinned_bytes=2021) if r == 3 else None)
        code, text = self.run_table(5, ["m a"])
        self.assertEqual(code, 1, text)
        self.assertRegex(text, r"m a\s+pinned\s+2021\s+2000\s+1\.05%")
        self.assertIn("worst memory difference 1.05% (limit 1%)", text)

    def test_memory_beyond_1_percent_fails_even_in_one_calibrations_plan(self):
        write_round(self.work, "m a", 0, (0.1, 0.1, 0.1), 0.1,
                    plan_memory=dict(MEMORY, device_bytes=989))
        code, text = self.run_table(1, ["m a"])
        self.assertEqual(code, 1, text)
        self.assertRegex(text, r"m a\s+device\s+989\s+1000\s+1\.10%")

    def test_memory_at_1_percent_passes(self):
        write_round(self.work, "m a", 0, 0.1, 0.1, plan_memory=dict(MEMORY, host_bytes=3030))
        self.assertEqual(self.run_table(1, ["m a"])[0], 0)

    def test_a_tier_the_run_does_not_use_must_be_planned_empty(self):
        write_round(self.work, "m a", 0, 0.1, 0.1, plan_memory=dict(MEMORY, heap_bytes=1))
        code, text = self.run_table(1, ["m a"])
        self.assertEqual(code, 1, text)
        self.assertRegex(text, r"m a\s+heap\s+1\s+0\s+100\.00%")

    def test_median_in_bounds_the_median_with_90_percent_or_more(self):
        # 8 rounds: the 2nd and 7th smallest (k = 2), 93%.
        low, high, confidence = table.median_in([5, 1, 8, 3, 7, 2, 6, 4])
        self.assertEqual((low, high), (2, 7))
        self.assertAlmostEqual(confidence, 1 - 2 * 9 / 256)
        # 5 rounds: the extremes, 93.75%; 16 rounds: k = 5, 92.3%.
        self.assertEqual(table.median_in([3, 1, 2, 5, 4])[:2], (1, 5))
        low, high, confidence = table.median_in(list(range(16)))
        self.assertEqual((low, high), (4, 11))
        self.assertGreaterEqual(confidence, 0.9)
        # Below 5 rounds no pair reaches 90%: every round's range, at its own confidence.
        self.assertEqual(table.median_in([0.2, -0.1, 0.05]), (-0.1, 0.2, 0.75))
        self.assertEqual(table.median_in([1.0]), (1.0, 1.0, 0.0))

    def test_drift_and_at_run_columns(self):
        # Calibrations alone predicting 0.09-0.12 against a run of 0.1: drift 30%; the plan at
        # the run's busy time 2% slow, and not circular (its step is not its busy time).
        for r in range(3):
            write_round(self.work, "m a", r, (0.09, 0.12, 0.1), 0.1, at_run=0.102)
        code, text = self.run_table(3, ["m a"])
        self.assertEqual(code, 0, text)
        row = next(l for l in text.splitlines() if l.startswith("m a") and "median" not in l
                   and "0.1000" in l)
        self.assertIn(" 30.0% ", row)
        self.assertIn("+2.0% ", row)
        self.assertNotIn("circular", text)

    def test_a_rounds_prediction_is_the_median_of_its_files_predictions(self):
        # Three files: the middle one's step (0.1, not their mean); four: the mean of the
        # middle two (0.104). The bottleneck is the file's nearest the median.
        write_round(self.work, "m a", 0, (0.2, 0.09, 0.1), 0.1,
                    bottlenecks=("h2d", "compute", "nvme"))
        write_round(self.work, "m b", 0, (0.2, 0.09, 0.108, 0.1), 0.1)
        code, text = self.run_table(1, ["m a", "m b"])
        self.assertEqual(code, 0, text)
        row_a = next(l for l in text.splitlines() if l.startswith("m a") and "nvme /" in l)
        self.assertRegex(row_a, r"m a\s+0\.1000\s+0\.1000\s+\+0\.0%")
        row_b = next(l for l in text.splitlines() if l.startswith("m b") and "optimizer /" in l)
        self.assertRegex(row_b, r"m b\s+0\.1040\s+0\.1000\s+\+4\.0%")
        # The optimizer's busy time is a median of its own: half of each step here.
        self.assertRegex(row_b, r"\+4\.0%\s+\S+\s+\S+\s+\+4\.0%")

    def test_at_run_is_marked_circular_where_the_plans_step_is_its_busy_time(self):
        for r in range(3):  # at_run < 0: that plan's optimizer is busy its whole step
            write_round(self.work, "m a", r, 0.1, 0.1, at_run=-0.1)
        code, text = self.run_table(3, ["m a"])
        self.assertIn("+0.0%*", text)
        self.assertIn("* at run is circular", text)

    def test_a_plan_of_another_strategy_than_the_run_is_refused(self):
        write_round(self.work, "m a", 0, 0.1, 0.1, run_strategy="zero-offload")
        with self.assertRaisesRegex(ValueError, "a plan of ecss against a run of zero-offload"):
            self.run_table(1, ["m a"])

    def test_a_run_of_no_step_time_fails_loudly(self):
        write_round(self.work, "m a", 0, 0.1, 0.0)
        with self.assertRaises(ZeroDivisionError):
            self.run_table(1, ["m a"])

    def test_a_missing_round_is_refused(self):
        write_round(self.work, "m a", 0, 0.1, 0.1)
        with self.assertRaisesRegex(ValueError, r"m\.a\.1: no prediction"):
            self.run_table(2, ["m a"])

    def test_a_prediction_without_its_at_run_plan_is_refused(self):
        write_round(self.work, "m a", 0, (0.1, 0.1), 0.1)
        os.remove(os.path.join(self.work, "m.a.0.alone.2.at-run-speed.plan.json"))
        with self.assertRaises(FileNotFoundError):
            self.run_table(1, ["m a"])


if __name__ == "__main__":
    unittest.main()
