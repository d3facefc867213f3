#!/usr/bin/env bash
# kill -9 at random points of a train_moe_lm run that checkpoints every step (inside steps and
# inside saves), ROUNDS times (default 50). Each time the newest durable checkpoint must load
# (its checks pass: model, session records, every block's CRC) and the run resumed from it must
# end as the uninterrupted run does: every step it prints has the straight run's loss for that
# step, and the last loss is equal in all its digits. A kill before the first checkpoint finds
# none, and --resume starts the run over in the same directory. Rounds go on until ROUNDS kills
# landed in a live run (at most twice as many rounds).
# Usage: kill_resume.sh TRAIN_MOE_LM SCRATCH_DIR [ROUNDS]
set -euo pipefail
program=$(realpath "$1")
scratch=$2
rounds=${3:-50}
steps=10
rm -rf "$scratch"
mkdir -p "$scratch"
cd "$scratch"
run() { "$program" --print-every 1 --trace trace.json --steps "$steps" "$@"; }
losses() { { grep -hE '^ +[0-9]+ ' "$1" || true; } | awk '{print $1, $2}'; }
fail() { echo "kill_resume: $*" >&2; exit 1; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

run > straight.txt
losses straight.txt > straight.losses
[ "$(wc -l < straight.losses)" -eq "$steps" ] || fail "the straight run printed no step losses"
straight_last=$(grep '^last loss' straight.txt)
# A checkpointing run in the background, its output in FILE; $pid is the program itself (exec),
# not a subshell around it. Returns once it printed its first step (or ended).
pid=
trap '[ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true' EXIT
start_checkpointing() {
  (exec "$program" --print-every 1 --trace trace.json --steps "$steps" --checkpoint-dir "$1" \
    --checkpoint-every 1 > "$2" 2>&1) &
  pid=$!
  for _ in $(seq 1 60000); do
    grep -qE '^ +0 ' "$2" && return 0
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.01
  done
}
# The kills land uniformly over a checkpointing run's steps and saves after its first step
# (over less of them once the window shrank, below).
start_checkpointing timing timing.txt
first_ms=$(now_ms)
wait "$pid" || fail "the timing run failed: $(tail -3 timing.txt)"
window_ms=$((($(now_ms) - first_ms) * 85 / 100 + 1))  # not its exit

# A kill that finds the run ended (its exit status is not SIGKILL's 137) still checks the
# resume, but does not count; the window then shrinks by a quarter, since the machine runs
# faster than it did for the timing run (ctest runs other tests beside this one).
landed=0
from_checkpoint=0  # of the landed kills
round=0
while [ "$landed" -lt "$rounds" ]; do
  round=$((round + 1))
  [ "$round" -le $((rounds * 2)) ] ||
    fail "only $landed of $((round - 1)) kills landed in a live run (window ${window_ms} ms)"
  dir=run-$round
  start_checkpointing "$dir" "killed-$round.txt"
  delay_ms=$((RANDOM * 32768 + RANDOM))
  delay_ms=$((delay_ms % window_ms))
  sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
  kill -KILL "$pid" 2>/dev/null || true
  status=0
  wait "$pid" 2>/dev/null || status=$?
  pid=
  case $status in
    137) landed=$((landed + 1)) ;;
    0) window_ms=$((window_ms * 3 / 4 + 1)) ;;
    *) fail "round $round: the checkpointing run failed by itself ($status):" \
      "$(tail -3 "killed-$round.txt")" ;;
  esac
  run --checkpoint-dir "$dir" --resume > "resumed-$round.txt" 2>&1 ||
    fail "round $round: the resume failed: $(tail -3 "resumed-$round.txt")"
  from=$(sed -n 's/^resuming from .*step-\([0-9]*\)$/\1/p' "resumed-$round.txt")
  if [ -n "$from" ]; then
    [ "$status" -ne 137 ] || from_checkpoint=$((from_checkpoint + 1))
  else
    grep -q "^no checkpoint in $dir yet" "resumed-$round.txt" ||
      fail "round $round: resumed from what? $(head -3 "resumed-$round.txt")"
    from=0
  fi
  losses "resumed-$round.txt" > resumed.losses
  [ "$(wc -l < resumed.losses)" -eq $((steps - from)) ] ||
    fail "round $round: resumed from step $from, it printed $(wc -l < resumed.losses) steps"
  # Each printed step's loss is the straight run's (grep -x: whole lines, -F: no patterns).
  grep -vxFf straight.losses resumed.losses > /dev/null &&
    fail "round $round (from step $from): $(grep -vxFf straight.losses resumed.losses | head -1)" \
      "differs from the straight run's"
  [ "$(grep '^last loss' "resumed-$round.txt")" = "$straight_last" ] ||
    fail "round $round: the last loss differs"
  rm -rf "$dir"
done
# Most kills find a checkpoint to resume from (a kill before the first save finds none).
[ "$from_checkpoint" -ge $((landed / 2)) ] ||
  fail "only $from_checkpoint of $landed killed runs resumed from a checkpoint"
echo "kill_resume: $landed kill -9s in $round rounds; $from_checkpoint of them resumed from" \
  "their newest checkpoint, the rest started over; every round ended as the straight run"
