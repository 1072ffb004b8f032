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

# build_blkbench SRC OUT: compiles bench/lib/blkbench.c statically (it runs in the guest's root
# file system, whatever libc that has).
build_blkbench() {
    gcc -O2 -static -Wall -o "$2" "$1" 2>"$2.gcc.log" || {
        cat "$2.gcc.log" >&2
        die "cannot build $1 statically (gcc and libc6-dev: scripts/install-deps.sh)"
    }
}

# root_with_blkbench ROOTFS BLKBENCH OUT: a copy of the fixture root image with BLKBENCH as
# /usr/bin/blkbench (the fixture initramfs switches to it with ferrovisor.root=/dev/vda).
root_with_blkbench() {
    cp "$1" "$3" || die "cannot copy $1"
    # debugfs does not fail on a failed request: check the result with stat.
    debugfs -w -f - "$3" >"$3.debugfs.log" 2>&1 <<EOF
write $2 /usr/bin/blkbench
sif /usr/bin/blkbench mode 0100755
sif /usr/bin/blkbench uid 0
sif /usr/bin/blkbench gid 0
EOF
    debugfs -R "stat /usr/bin/blkbench" "$3" 2>/dev/null |
        grep -q "Mode:  0755" || { cat "$3.debugfs.log" >&2; die "cannot add blkbench to the root image"; }
}
