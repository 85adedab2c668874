# Steps of a device call, each bounded by `timeout` and by the call's budget, so that one slow
# step cannot cost the call the others. Sourced by tools/demo_measurements.sh and
# tools/hopper_measurements.sh, which define `pack` (what to bring back after each step).
#   BUDGET  seconds for all steps of the call (default 540: a 10-minute call less its start and
#           the transfers)
start=$SECONDS
budget=${BUDGET:-540}

step() {  # step SECONDS COMMAND...: run it, bounded by SECONDS and by the call's budget, then pack
    local limit=$1 left=$((budget - (SECONDS - start)))
    shift
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "== skipped, ${left} s left in the call: $*"
        return
    fi
    echo "== $* (at most ${limit} s)"
    timeout "$limit" "$@" 2>&1 | grep -v "it/s]\|s/it]" | tail -40
    echo "== status ${PIPESTATUS[0]}, $((SECONDS - start)) s into the call"
    pack
}
