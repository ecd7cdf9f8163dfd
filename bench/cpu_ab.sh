#!/bin/sh
# Server CPU per 1000 chat messages over a fixed 6 s window of steady traffic,
# for one source tree: the A/B used for issue 14 when bench/compare could not
# run (another compare held its ports; load average 9-13 on two cores).
#
#   bench/cpu_ab.sh SRC SHARDS RATE CONFIG [PORT]
#
# SRC: a source tree (e.g. `git archive REV | tar -x -C DIR`); CONFIG: an
# `mlink init` configuration (plain TCP allowed: required="false") whose c2s
# port is PORT (default 35222), with users u1..u1000 (password pwN)
# imported. Prints user and system CPU-s per 1000 messages of the server
# (supervisor and shards, from /proc), measured after all 1000 sessions
# are up. Bounded: the generator runs 16 s at most.
# PYTHON: the interpreter (default: the checkout's .venv). CPU_SPLIT=threads
# splits the figure into the processes' main threads (the event loops) and
# every other thread (SQLite's workers, from the process totals, which keep
# the time of threads that have ended) instead of user and system time
# (bench/cpu_ab_threads.sh, issue 16's archive A/B).
set -e
src=$1 shards=$2 rate=$3 config=$4 port=${5:-35222}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../.venv/bin/python}
split=${CPU_SPLIT:-time}
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
if [ "$split" = threads ]; then
    t() {
        for p in $pid $(pgrep -P $pid); do
            echo "main $(awk '{print $14+$15}' /proc/$p/task/$p/stat)"
            echo "all $(awk '{print $14+$15}' /proc/$p/stat)"
        done | awk '{s[$1]+=$2} END {print s["main"]+0, s["all"]-s["main"]}'
    }
    names="main threads"
else
    t() { for p in $pid $(pgrep -P $pid); do cat /proc/$p/stat; done | awk '{u+=$14; s+=$15} END {print u, s}'; }
    names="user sys"
fi
a=$(t); sleep 6; b=$(t)
echo "$a $b" | awk -v r="$rate" -v src="$src" -v sh="$shards" -v names="$names" '{
    split(names, n, " "); x=($3-$1)/100; y=($4-$2)/100; k=6*r/1000;
    printf "%s shards=%s rate=%s %s %.3f %s %.3f CPU-s/1000 %.3f\n", src, sh, r,
    n[1], x/k, n[2], y/k, (x+y)/k}'
wait $gen || true
kill $pid; wait $pid || true
