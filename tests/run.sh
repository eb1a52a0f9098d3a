#!/usr/bin/env bash
# Runs each Criterion test binary given as an argument and fails unless
# every one ran at least one test and passed. Criterion exits 0 for a
# binary with no tests and does not fail on LeakSanitizer reports, so both
# are checked here from its output. Prints "N passed, N failed" at the end.
# With TSAN set (make tsan), every process stops at its first
# ThreadSanitizer report and writes it under $logdir/tsan/, which fails
# the binary that was running: reports do not depend on where a test sends
# a router's stderr.
set -u
bin="${BIN:-costrouter}"
case "$bin" in */*) ;; *) bin="./$bin" ;; esac
export COSTROUTER_BIN="$bin"
export MOCKLLM_BIN="${BUILD:-build}/mockllm"
export COSTROUTER_SRC="$(pwd)"
logdir="${BUILD:-build}/test-logs"
mkdir -p "$logdir"
passed=0 failed=0 bad=0
# Criterion 2.4.1's runner (parent process) leaks 48 bytes at exit when
# tests with .timeout run in parallel, which LeakSanitizer reports; the
# sanitized run uses one job so that only real leaks are reported.
jobs=2
[ -n "${SANITIZED:-}" ] && jobs=1
tsandir="$(cd "$logdir" && pwd)/tsan" # absolute: a process may run elsewhere
if [ -n "${TSAN:-}" ]; then
    rm -rf "$tsandir"
    mkdir -p "$tsandir"
fi
for t in "$@"; do
    name=$(basename "$t")
    log="$logdir/$name.log"
    [ -n "${TSAN:-}" ] && export TSAN_OPTIONS="halt_on_error=1 exitcode=66 log_path=$tsandir/$name"
    "$t" --jobs "$jobs" >"$log" 2>&1
    rc=$?
    synth=$(grep -a 'Synthesis:' "$log" | tail -1)
    tested=$(sed -n 's/.*Tested: \([0-9]*\).*/\1/p' <<<"$synth")
    pass=$(sed -n 's/.*Passing: \([0-9]*\).*/\1/p' <<<"$synth")
    fail=$(( ${tested:-0} - ${pass:-0} ))
    problem=""
    [ "$rc" -ne 0 ] && problem="exit $rc"
    [ "${tested:-0}" -eq 0 ] && problem="$problem no tests ran"
    if [ -n "${SANITIZED:-}" ] && grep -aqE 'ERROR: (Address|Leak|UndefinedBehavior)Sanitizer|runtime error:' "$log"; then
        problem="$problem sanitizer report"
    fi
    if [ -n "${TSAN:-}" ] && ls "$tsandir/$name".* >/dev/null 2>&1; then
        problem="$problem ThreadSanitizer report"
        cat "$tsandir/$name".* >>"$log"
    fi
    passed=$(( passed + ${pass:-0} ))
    failed=$(( failed + fail ))
    if [ -n "$problem" ]; then
        bad=$(( bad + 1 ))
        echo "FAIL $name ($problem): log follows"
        cat "$log"
    else
        echo "ok   $name: $synth"
    fi
done
echo "tests: $passed passed, $failed failed"
[ "$bad" -eq 0 ] && [ "$failed" -eq 0 ]
