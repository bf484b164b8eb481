# Settings shared by the namespace-host scripts (sourced after lib.sh, not run).
# shellcheck shell=bash disable=SC2034 # variables for the scripts that source this

netns_prefix="dvm-"
netns_run=/run/netns
netns_subnet=10.77.0
netns_dir="${DVM_NETNS_DIR:-$repo/target/cluster/netns}"
# The hosts are machine-wide (namespace names are global): netns-up records here the directory
# holding their files, so that `on` finds them whatever the caller's environment.
netns_marker=/run/dvm-netns.dir

# The files directory of the hosts that are up (falls back to $netns_dir).
netns_current_dir() {
    if [ -s "$netns_marker" ]; then cat "$netns_marker"; else echo "$netns_dir"; fi
}

# The number of hosts asked for: $DVM_NETNS_HOSTS, default 3.
netns_host_count() {
    local n="${DVM_NETNS_HOSTS:-3}"
    [[ "$n" =~ ^[1-9]$ ]] || die "DVM_NETNS_HOSTS=$n: expected 1..9"
    echo "$n"
}

# Checks that $1 names a host that is up (h1, h2, ...) and prints its namespace name.
netns_of() {
    local h=$1
    [[ "$h" =~ ^h[1-9]$ ]] || die "'$h' is not a host name (h1, h2, ...)"
    [ -e "$netns_run/$netns_prefix$h" ] || die "host $h is not up (run scripts/cluster/netns-up)"
    echo "$netns_prefix$h"
}
