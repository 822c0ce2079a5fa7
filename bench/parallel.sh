#!/bin/bash
# The bench's rows side by side, for a machine that one process leaves mostly idle (a GPU): each
# (architecture, attack) victim in a process of its own, each defense in a run of its own (a crash
# costs one cell, not the victim's row), the defenses in the order given, until DEADLINE seconds
# have passed; then the table is rewritten into OUT. Unfinished rows stay "not run", and the same
# command resumes them (rows are kept in bench/results, trained models in .cache/bench).
#
#   SUITE=cifar10 DEVICE=cuda DEADLINE=3600 bench/parallel.sh docs
#
# Settings (environment): SUITE (cifar10), DEVICE (cuda), DEADLINE (seconds, 3600), ARCHS and
# ATTACKS (the suite's), DEFENSES (ours first, then the baselines). The first architecture's
# victims train first, the others once its clean model is there, and a Trojan victim, whose trigger
# is fitted on the clean model, once that model is. Each victim's log: OUT/logs/ARCH-ATTACK.log.
set -u
out=${1:?usage: bench/parallel.sh OUT}
suite=${SUITE:-cifar10}; device=${DEVICE:-cuda}; deadline=${DEADLINE:-3600}
defenses=${DEFENSES:-"baerase nc ft fp i-bau anp baerase-paper"}
python=${PYTHON:-python3}
start=$(date +%s)
left() { echo $((start + deadline - $(date +%s))); }
suite_setting() { $python -c "from bench.run import SUITES; s = SUITES['$suite']; print(' '.join(s.$1))"; }
archs=${ARCHS:-$(suite_setting archs)}; attacks=${ATTACKS:-$(suite_setting attacks)}
mkdir -p "$out/logs"
# The images are decoded and cached once, before the victims' processes read them.
$python -c "from pathlib import Path; from bench.run import SUITES; SUITES['$suite'].data(Path('.cache/bench'))" || exit 1

victim_rows() {  # $1 architecture, $2 attack
  for defense in $defenses; do
    [ "$(left)" -gt 15 ] || { echo "deadline: $1/$2/$defense not run"; return; }
    # One thread per process: the processes share the machine's cores.
    OMP_NUM_THREADS=1 timeout -s INT -k 10 "$(left)" $python -m bench.run --suite "$suite" --device "$device" \
      --archs "$1" --attacks "$2" --defenses "$defense" --out "$out/logs/tables" || echo "failed or stopped: $1/$2/$defense"
  done
}
clean_model_trained() {  # $1 architecture; waits while it is not (and time is left)
  until ls .cache/bench/models/"$suite"/"$1"-clean-*.pt >/dev/null 2>&1 || [ "$(left)" -le 15 ]; do sleep 3; done
}

first=${archs%% *}
for arch in $archs; do
  [ "$arch" = "$first" ] || clean_model_trained "$first"
  for attack in $attacks; do
    if [ "$attack" = trojan ]; then (clean_model_trained "$arch"; victim_rows "$arch" trojan)
    else victim_rows "$arch" "$attack"; fi > "$out/logs/$arch-$attack.log" 2>&1 &
  done
done
wait
rm -rf "$out/logs/tables"
$python -m bench.run --suite "$suite" --table-only --out "$out"
grep -h "failed\|deadline\|Error" "$out"/logs/*.log
echo "finished after $(( $(date +%s) - start )) s"
