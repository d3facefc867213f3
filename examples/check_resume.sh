#!/usr/bin/env bash
# train_moe_lm's checkpoints resume bit for bit: 12 steps straight against 6 steps, a
# checkpoint, and a --resume to 12 (with RRE and with learned gates); and a run stopped by
# SIGTERM (a checkpoint at the end of its step) and resumed against a straight run of the same
# length; in a scratch directory. The per-step losses and the last loss (all its digits) must
# be equal.
# Usage: check_resume.sh TRAIN_MOE_LM SCRATCH_DIR
set -euo pipefail
program=$(realpath "$1")
scratch=$2
rm -rf "$scratch"
mkdir -p "$scratch"
cd "$scratch"
run() { "$program" --print-every 1 --trace trace.json "$@"; }
# Each step's loss (step, loss columns), then the last loss with all its digits.
losses() { grep -hE '^ +[0-9]+ ' "$@" | awk '{print $1, $2}'; grep -h '^last loss' "${@: -1}"; }
fail() { echo "check_resume: $*" >&2; exit 1; }
# The losses of STRAIGHT against those of the pieces that continued each other (in order).
expect_same() {
  local straight=$1 what=$2
  shift 2
  diff <(losses "$straight") <(losses "$@") || fail "$what differs from the straight run"
}

run --steps 12 --checkpoint-dir straight --checkpoint-every 6 > straight.txt
run --steps 6 --checkpoint-dir stopped --checkpoint-every 6 > first.txt
run --steps 12 --checkpoint-dir stopped --resume > resumed.txt
grep -q "resuming from stopped/step-6" resumed.txt
# A fresh run into a directory of checkpoints is refused, not silently mixed with them.
if run --steps 1 --checkpoint-dir stopped > refused.txt 2>&1; then
  fail "a fresh run into a directory of checkpoints was not refused"
fi
grep -q "ALREADY_EXISTS" refused.txt
expect_same straight.txt "the resumed run" first.txt resumed.txt
echo "check_resume: 6 + 6 resumed steps equal 12 straight ones"
# Learned gates: the gates and their moments are the loop's state; a resume with the other
# routing is refused.
run --routing gate --steps 12 > gate_straight.txt
run --routing gate --steps 6 --checkpoint-dir gated > gate_first.txt
if run --steps 12 --checkpoint-dir gated --resume > gate_refused.txt 2>&1; then
  fail "a gate run's checkpoint resumed with RRE routing"
fi
grep -q "trained with --routing gate" gate_refused.txt
run --routing gate --steps 12 --checkpoint-dir gated --resume > gate_resumed.txt
expect_same gate_straight.txt "the resumed gate run" gate_first.txt gate_resumed.txt
echo "check_resume: the same with learned gates"
# SIGTERM mid-run: a checkpoint at the end of that step, exit 0; resumed, it continues as a
# straight run of the same length would.
"$program" --print-every 1 --trace trace.json --steps 1000000 --checkpoint-dir signalled \
  > signalled.txt 2>&1 &
pid=$!
trap 'kill -KILL "$pid" 2>/dev/null || true' EXIT  # never leave the long run behind
# A step line proves the stop handler is installed (before the first step); a loaded machine
# may take long to get there.
for _ in $(seq 1 6000); do
  grep -qE '^ +0 ' signalled.txt && break
  kill -0 "$pid" 2>/dev/null || fail "the run to be signalled ended early: $(cat signalled.txt)"
  sleep 0.1
done
grep -qE '^ +0 ' signalled.txt || fail "no step within 600 s"
kill -TERM "$pid"
wait "$pid" || fail "the signalled run did not exit 0: $(tail -5 signalled.txt)"
grep -q "stopped by signal 15 after step" signalled.txt
stopped_at=$(sed -n 's/^stopped by signal 15 after step \([0-9]*\);.*/\1/p' signalled.txt)
total=$((stopped_at + 3))
run --steps "$total" --checkpoint-dir signalled --resume > signalled_resumed.txt
run --steps "$total" > signalled_straight.txt
expect_same signalled_straight.txt "the run resumed after SIGTERM" signalled.txt \
  signalled_resumed.txt
echo "check_resume: SIGTERM after step $stopped_at, resumed to $total: equal to a straight run"
