#!/bin/sh
# Server CPU per 1000 chat messages, split by thread: the processes' main
# threads (the event loops) and every other thread (SQLite's workers,
# counted from the process totals, which keep the time of threads that have
# ended). Otherwise as bench/cpu_ab.sh: one source tree, a fixed 6 s window
# of steady traffic after all 1,000 sessions are up, bounded (the generator
# runs 16 s at most). Used for issue 16's archive A/B.
#
#   bench/cpu_ab_threads.sh SRC SHARDS RATE CONFIG [PORT]
#
# PYTHON: the interpreter (default: the checkout's .venv).
set -e
src=$1 shards=$2 rate=$3 config=$4 port=${5:-35222}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../.venv/bin/python}
while ss -ltn | grep -q ":$port "; do sleep 0.5; done
PYTHONPATH=$src "$python" -m mlink.admin.cli serve --config "$config" \
    --shards "$shards" >/dev/null 2>&1 &
pid=$!
n=0; while [ $n -lt 120 ] && ! ss -ltn | grep -q ":$port "; do sleep 0.3; n=$((n+1)); done
sleep 1
(cd "$here" && PYTHONPATH="$here" timeout 120 "$python" -m loadgen chat \
    --port "$port" --domain localhost --no-tls --mechanism PLAIN --pairs 500 --rate "$rate" \
    --seconds 16 --ramp 0 --server-pid $pid >/dev/null 2>&1) &
gen=$!
n=0
while [ $n -lt 60 ] && [ "$(ss -tn state established "( sport = :$port )" | wc -l)" -lt 1000 ]; do
    sleep 0.5; n=$((n+1))
done
sleep 3
t() {
    for p in $pid $(pgrep -P $pid); do
        echo "main $(awk '{print $14+$15}' /proc/$p/task/$p/stat)"
        echo "all $(awk '{print $14+$15}' /proc/$p/stat)"
    done | awk '{s[$1]+=$2} END {print s["main"]+0, s["all"]-s["main"]}'
}
a=$(t); sleep 6; b=$(t)
echo "$a $b" | awk -v r="$rate" -v src="$src" -v sh="$shards" '{m=($3-$1)/100; o=($4-$2)/100;
    k=6*r/1000; printf "%s shards=%s rate=%s main %.3f threads %.3f total %.3f CPU-s/1000\n",
    src, sh, r, m/k, o/k, (m+o)/k}'
wait $gen || true
kill $pid; wait $pid || true
