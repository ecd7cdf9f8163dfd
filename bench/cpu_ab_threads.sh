#!/bin/sh
# Server CPU per 1000 chat messages, split into the event loops (the
# processes' main threads) and every other thread: bench/cpu_ab.sh with
# CPU_SPLIT=threads (see there). Used for issue 16's archive A/B.
#
#   bench/cpu_ab_threads.sh SRC SHARDS RATE CONFIG [PORT]
CPU_SPLIT=threads exec "$(dirname "$0")/cpu_ab.sh" "$@"
