# Shared by the bench/*.sh drivers (source it): what every results section records about the
# host and the build, and where the logs of failed runs are kept. Each driver defines `note`.

# keep_failed_logs RC LOGDIR RESULTS PREFIX: if RC is not 0, copies LOGDIR to
# RESULTS/PREFIX-logs-<time> and says so.
keep_failed_logs() {
    [ "$1" -ne 0 ] || return 0
    local keep
    keep="$3/$4-logs-$(date +%Y%m%d-%H%M%S)"
    cp -r "$2" "$keep" 2>/dev/null || true
    note "some runs failed; their output is kept in $keep"
}

# host_facts REPO QEMU: sets cpu (model name), kvm (the loaded KVM module, or none), rev (the
# commit, "(dirty)" with uncommitted changes) and qv (QEMU's version line).
host_facts() {
    cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
    kvm=none
    local m
    for m in kvm_intel kvm_amd kvm_pvm; do [ -d "/sys/module/$m" ] && kvm=$m && break; done
    rev=$(cd "$1" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
    [ -z "$(cd "$1" && git status --porcelain --untracked-files=no 2>/dev/null)" ] || rev="$rev (dirty)"
    qv=$("$2" --version 2>/dev/null | head -n1 || true)
}
