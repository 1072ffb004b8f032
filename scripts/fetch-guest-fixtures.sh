#!/usr/bin/env bash
# Fetch and build the Linux guest fixtures the tests and benchmarks boot.
#
#   scripts/fetch-guest-fixtures.sh [--force] [--update] [DIR]
#
# DIR defaults to <repo>/fixtures (gitignored). From Debian 12's archive (apt-get download;
# nothing pinned by hand: whatever linux-image-cloud-amd64 currently depends on) it produces:
#   vmlinuz            the cloud kernel's bzImage (/boot/vmlinuz-*)
#   vmlinux            the uncompressed ELF kernel (has the Xen PVH entry note)
#   initramfs.cpio.gz  newc cpio: busybox-static + applet symlinks, /init, virtio modules
#   rootfs.ext4        64 MiB ext4 image (label ferrovisor-root, fixed UUID, reproducible):
#                      busybox-static + applet symlinks and its own /sbin/init, no modules;
#                      /usr/bin/vsock-test (scripts/lib/vsock-test.c, gcc -O2 -static -s: an
#                      AF_VSOCK peer for the virtio-vsock tests, which busybox cannot be) and
#                      /usr/bin/tcp-xfer (scripts/lib/tcp-xfer.c: bulk TCP send/receive for
#                      the virtio-net tests; busybox nc copies in small chunks)
#   VERSION            KEY=VALUE: fixture format, kernel package, version, release; busybox;
#                      the test tools' source hash and compiler
#   fixtures.sha256    sha256sum of the above
#
# The initramfs /init mounts proc, sys, devtmpfs and tmpfs, prints FERROVISOR-GUEST-READY
# on the console and runs `poweroff -f`. At any point a graceful-shutdown request (the VMM
# types Ctrl-Alt-Del; /init sets /proc/sys/kernel/ctrl-alt-del to 0 first thing, so the kernel
# sends it SIGINT) makes it print FERROVISOR-SHUTDOWN, sync and `poweroff -f`, within a count
# interval or a shell session too. Kernel command line switches:
#   ferrovisor.modules=1   insmod the virtio modules (lib/modules/<release>/modules.load)
#                          before the marker
#   ferrovisor.shell=1     after the marker, an interactive shell on the console instead
#                          of powering off (poweroff -f when the shell exits)
#   ferrovisor.count=MS    after the marker, print "count 1", "count 2", ... forever, one
#                          line every MS milliseconds (snapshot tests: a restored guest must
#                          continue with the next number)
#   ferrovisor.root=DEV    instead of the marker: load the modules, wait up to 10 s for DEV
#                          (e.g. /dev/vda), mount it as ext4 on /newroot (read-write unless
#                          ferrovisor.rootro=1), move /dev /proc /sys there and switch_root
#                          to its /sbin/init. Any failure prints one line "init: <what>" and
#                          powers off.
# rootfs.ext4's /sbin/init mounts what is not mounted yet, prints FERROVISOR-ROOT-READY and
# "root: <its /proc/mounts line for />", then honours ferrovisor.shell=1 the same way and
# powers off (after remounting / read-only). A shutdown request there prints
# FERROVISOR-SHUTDOWN, stops every other process (TERM, then KILL), syncs, remounts /
# read-only and powers off. (Between the initramfs's exec of switch_root and the root's init
# setting its trap, a request is lost: the VMM's timeout covers that.) Boot a copy of rootfs.ext4: a read-write mount
# changes the image, and a changed image fails fixtures.sha256 (the next run rebuilds it).
#
# Fast when nothing changed: if the outputs exist, verify against fixtures.sha256 and VERSION
# names the kernel package apt currently resolves, it exits at once. --force rebuilds;
# --update runs `apt-get update` first (otherwise only when a package cannot be found or
# downloaded).
set -euo pipefail

# Bump when the content of the outputs changes for the same packages (init script, layout).
FIXTURE_FORMAT=7
META_PKG=linux-image-cloud-amd64
BUSYBOX_PKG=busybox-static
MODULES=(virtio virtio_ring virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev
         virtio_blk virtio_net net_failover failover virtio_mmio virtio_console virtio_rng
         vmw_vsock_virtio_transport vmw_vsock_virtio_transport_common vsock virtio_balloon
         ext4 jbd2 mbcache crc16 crc32c_generic)
OUTPUTS=(vmlinuz vmlinux initramfs.cpio.gz rootfs.ext4 VERSION)
# rootfs.ext4: fixed identity and timestamps so that the same packages give the same bytes.
ROOTFS_SIZE=64M
ROOTFS_LABEL=ferrovisor-root
ROOTFS_UUID=6f2d1c9e-7b3a-4e51-9a0d-3c8e5f1b2a47
ROOTFS_HASH_SEED=0b7e1d5a-2c94-4f36-8e1b-9d2a6c3f5e80
# Every timestamp in the image (mke2fs treats an E2FSPROGS_FAKE_TIME of 0 as unset).
ROOTFS_TIME=${SOURCE_DATE_EPOCH:-0}
[ "$ROOTFS_TIME" != 0 ] || ROOTFS_TIME=1704067200   # 2024-01-01T00:00:00Z

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
tool="$here/lib/fixture_tool.py"

force=0 update=0 dir=
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --update) update=1 ;;
        -h|--help) sed -n '2,49p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fetch-guest-fixtures: unknown option: $arg" >&2; exit 2 ;;
        *) [ -z "$dir" ] || { echo "fetch-guest-fixtures: more than one DIR" >&2; exit 2; }
           dir=$arg ;;
    esac
done
dir=${dir:-$repo/fixtures}

log() { echo "fetch-guest-fixtures: $*" >&2; }
die() { echo "fetch-guest-fixtures: ERROR: $*" >&2; exit 1; }

# mke2fs and debugfs live in /usr/sbin, which a normal user's PATH may lack.
PATH=$PATH:/usr/sbin:/sbin
for cmd in apt-get apt-cache dpkg-deb python3 sha256sum lz4 mkfs.ext4 debugfs truncate gcc; do
    command -v "$cmd" >/dev/null 2>&1 ||
        die "'$cmd' not found; run scripts/install-deps.sh (Debian 12 with apt is required)"
done

export DEBIAN_FRONTEND=noninteractive
SUDO=()
[ "$(id -u)" -eq 0 ] || ! command -v sudo >/dev/null 2>&1 || SUDO=(sudo)

updated=0
apt_update() {
    [ "$updated" = 0 ] || return 0
    log "apt-get update"
    "${SUDO[@]}" apt-get -qq update >/dev/null ||
        die "apt-get update failed (no access to Debian's archive?)"
    updated=1
}
[ "$update" = 0 ] || apt_update

# The versioned kernel package the meta package depends on, e.g. linux-image-6.1.0-56-cloud-amd64.
resolve_kernel_pkg() {
    apt-cache depends "$META_PKG" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1
}
# "pkg candidate" lines for the given packages, in one apt-cache run.
candidates() {
    apt-cache policy "$@" 2>/dev/null |
        awk '/^[^ ].*:$/ { p = substr($0, 1, length($0) - 1) } /^ *Candidate:/ { print p, $2 }'
}
# apt-cache takes ~1 s per call here (the image disables apt's binary cache), so the result is
# remembered next to the fixtures, keyed by the package lists and apt's configuration.
apt_state() {
    stat -c '%n %s %Y' /var/lib/apt/lists/* /etc/apt/sources.list* /etc/apt/preferences* \
        /etc/apt/apt.conf.d/* 2>/dev/null | sha256sum | cut -d' ' -f1
}
resolve() {
    local state cache="$dir/.apt-resolved" c
    state=$(apt_state)
    if [ "$force" = 0 ] && [ -f "$cache" ] && [ "$(head -n1 "$cache")" = "$state" ]; then
        { read -r _; read -r kpkg; read -r kver; read -r bbver; } <"$cache"
        [ -n "$kpkg" ] && [ -n "$kver" ] && [ -n "$bbver" ] && return 0
    fi
    kpkg=$(resolve_kernel_pkg)
    if [ -z "$kpkg" ] && [ "$updated" = 0 ]; then
        apt_update; state=$(apt_state); kpkg=$(resolve_kernel_pkg)
    fi
    [ -n "$kpkg" ] ||
        die "cannot resolve $META_PKG to a versioned kernel package (apt-cache depends $META_PKG)"
    c=$(candidates "$kpkg" "$BUSYBOX_PKG")
    kver=$(awk -v p="$kpkg" '$1 == p { print $2 }' <<<"$c")
    bbver=$(awk -v p="$BUSYBOX_PKG" '$1 == p { print $2 }' <<<"$c")
    if { [ -z "$kver" ] || [ "$kver" = "(none)" ] || [ -z "$bbver" ] || [ "$bbver" = "(none)" ]; } &&
        [ "$updated" = 0 ]; then
        apt_update; resolve; return
    fi
    [ -n "$kver" ] && [ "$kver" != "(none)" ] || die "no installable candidate for $kpkg"
    [ -n "$bbver" ] && [ "$bbver" != "(none)" ] || die "no installable candidate for $BUSYBOX_PKG"
    if mkdir -p "$dir" 2>/dev/null; then
        printf '%s\n' "$state" "$kpkg" "$kver" "$bbver" >"$cache" 2>/dev/null || true
    fi
}
set_version() {
    case "$kpkg" in
        linux-image-6.1.0-*-cloud-amd64) ;;
        *) log "warning: $META_PKG resolves to $kpkg, not a 6.1 cloud kernel" ;;
    esac
    krel=${kpkg#linux-image-}
    # The same sources, compiler and C library give the same vsock-test and tcp-xfer bytes.
    vsock_test="$(cat "$here/lib/vsock-test.c" "$here/lib/tcp-xfer.c" | sha256sum | cut -c1-16)"
    vsock_test+=" gcc-$(gcc -dumpfullversion)"
    vsock_test+=" libc6-dev-$(dpkg-query -W -f='${Version}' libc6-dev 2>/dev/null || echo none)"
    want_version="FIXTURE_FORMAT=$FIXTURE_FORMAT
KERNEL_PACKAGE=$kpkg
KERNEL_VERSION=$kver
KERNEL_RELEASE=$krel
BUSYBOX_VERSION=$bbver
VSOCK_TEST=$vsock_test"
}
resolve
set_version
# ---------------------------------------------------------------- up to date?
if [ "$force" = 0 ] && [ -f "$dir/fixtures.sha256" ] && [ -f "$dir/VERSION" ] &&
    [ "$(cat "$dir/VERSION")" = "$want_version" ]; then
    all=1
    for f in "${OUTPUTS[@]}"; do [ -s "$dir/$f" ] || all=0; done
    if [ "$all" = 1 ] && (cd "$dir" && sha256sum --quiet --status -c fixtures.sha256); then
        log "up to date in $dir ($kpkg $kver); --force to rebuild"
        exit 0
    fi
    log "fixtures in $dir are incomplete or modified; rebuilding"
fi

# ---------------------------------------------------------------- download
work=$(mktemp -d "${TMPDIR:-/tmp}/ferrovisor-fixtures.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debs" "$work/root" "$work/stage"
# apt-get download drops privileges to _apt when run as root; let it write there.
if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$work/debs"; fi

download() {
    (cd "$work/debs" && apt-get download -qq "$@" >"$work/download.log" 2>&1)
}
log "downloading $kpkg=$kver $BUSYBOX_PKG=$bbver"
if ! download "$kpkg=$kver" "$BUSYBOX_PKG=$bbver"; then
    # Stale package lists (the archive moved on): refresh once and resolve again.
    if [ "$updated" = 0 ]; then
        apt_update
        resolve
        set_version
        download "$kpkg=$kver" "$BUSYBOX_PKG=$bbver" || { cat "$work/download.log" >&2; die "apt-get download failed"; }
    else
        cat "$work/download.log" >&2; die "apt-get download failed"
    fi
fi
for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb -x $deb failed"
done

bzimage="$work/root/boot/vmlinuz-$krel"
modroot="$work/root/lib/modules/$krel"
busybox="$work/root/bin/busybox"
[ -f "$bzimage" ] || die "$kpkg has no /boot/vmlinuz-$krel"
[ -d "$modroot" ] || die "$kpkg has no /lib/modules/$krel"
[ -x "$busybox" ] || die "$BUSYBOX_PKG has no /bin/busybox"

mkdir -p "$dir"
out="$work/out"
mkdir -p "$out"
cp "$bzimage" "$out/vmlinuz"
python3 "$tool" extract-vmlinux "$out/vmlinuz" "$out/vmlinux"

# ---------------------------------------------------------------- busybox trees
# stage_busybox_tree DIR: a minimal root tree in DIR: the usual directories, busybox-static with
# a symlink for every applet where busybox itself would install it (bin/sh, sbin/poweroff,
# ...), /etc/passwd and /etc/group. Shared by the initramfs and rootfs.ext4.
stage_busybox_tree() {
    local t=$1 path target need
    mkdir -p "$t"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc,mnt}
    chmod 1777 "$t/tmp"
    chmod 0700 "$t/root"
    cp "$busybox" "$t/bin/busybox"
    chmod 0755 "$t/bin/busybox"
    "$busybox" --list-full | while read -r path; do
        [ "$path" != bin/busybox ] || continue
        case "$path" in
            bin/*) target=busybox ;;
            sbin/*) target=../bin/busybox ;;
            usr/bin/*|usr/sbin/*) target=../../bin/busybox ;;
            *) continue ;;
        esac
        [ -e "$t/$path" ] || ln -s "$target" "$t/$path"
    done
    for need in sh mount umount mkdir cat echo grep tail sleep sync poweroff setsid \
        cttyhack insmod modprobe switch_root; do
        [ -e "$t/bin/$need" ] || [ -e "$t/sbin/$need" ] || [ -e "$t/usr/bin/$need" ] ||
            [ -e "$t/usr/sbin/$need" ] ||
            die "busybox $bbver lacks the '$need' applet"
    done
    cat >"$t/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
    cat >"$t/etc/group" <<'EOF'
root:x:0:
EOF
}
# The initramfs waits for the root device with `sleep 0.1`; busybox must take fractions.
"$busybox" sleep 0.01 2>/dev/null || die "busybox $bbver's sleep does not take fractional seconds"

# ---------------------------------------------------------------- initramfs
st="$work/stage"
stage_busybox_tree "$st"
mkdir -p "$st/lib/modules" "$st/newroot"

python3 "$tool" modules "$modroot" "$st/lib/modules/$krel" "${MODULES[@]}"

cat >"$st/init" <<'EOF'
#!/bin/sh
# Ferrovisor test initramfs (scripts/fetch-guest-fixtures.sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
# Graceful shutdown: the VMM types Ctrl-Alt-Del. With ctrl-alt-del at 0 the kernel sends SIGINT
# to PID 1 (this script) instead of rebooting at once.
echo 0 >/proc/sys/kernel/ctrl-alt-del
shutdown_request() {
    echo FERROVISOR-SHUTDOWN
    sync
    poweroff -f
}
trap shutdown_request INT
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
cmdline=" $(cat /proc/cmdline) "

# ferrovisor.root=DEV: switch_root into the ext4 file system on DEV instead of staying here.
# ferrovisor.count=MS: after the marker, count on the console every MS milliseconds.
root=
count_ms=
set -f
for arg in $cmdline; do
    case "$arg" in
    ferrovisor.root=*) root=${arg#ferrovisor.root=} ;;
    ferrovisor.count=*) count_ms=${arg#ferrovisor.count=} ;;
    esac
done
set +f

# On the way to the root file system: one line saying what failed, then power off, so that a
# test fails at once instead of hanging.
fail() {
    echo "init: $*"
    poweroff -f
    exit 1
}

load_modules() {
    moddir=/lib/modules/$(uname -r)
    while read -r m; do
        insmod "$moddir/$m" || echo "init: insmod $m failed"
    done <"$moddir/modules.load"
}

case "$cmdline" in
*" ferrovisor.modules=1 "*) load_modules ;;
*) [ -z "$root" ] || load_modules ;;
esac

if [ -n "$root" ]; then
    # The disk appears when virtio_blk has probed it; give it up to 10 s of uptime.
    uptime_cs() {  # /proc/uptime in hundredths of a second ("12.34 ..." -> 1234)
        read -r up _ </proc/uptime
        frac=${up#*.}
        echo $((${up%.*} * 100 + ${frac#0}))
    }
    deadline=$(($(uptime_cs) + 1000))
    while [ ! -b "$root" ]; do
        [ "$(uptime_cs)" -lt "$deadline" ] || fail "$root did not appear in 10 s"
        sleep 0.1
    done
    mode=rw
    case "$cmdline" in
    *" ferrovisor.rootro=1 "*) mode=ro ;;
    esac
    mkdir -p /newroot
    mount -t ext4 -o "$mode" "$root" /newroot ||
        fail "cannot mount $root (ext4, $mode) on /newroot"
    for p in sbin/init dev proc sys; do
        [ -e "/newroot/$p" ] || { umount /newroot; fail "$root has no /$p"; }
    done
    [ -x /newroot/sbin/init ] || { umount /newroot; fail "$root: /sbin/init is not executable"; }
    echo "initramfs: switch_root to $root (ext4, $mode)"
    umount /tmp
    mount --move /dev /newroot/dev || fail "cannot move /dev to $root"
    mount --move /proc /newroot/proc || fail "cannot move /proc to $root"
    mount --move /sys /newroot/sys || fail "cannot move /sys to $root"
    # switch_root must be PID 1: exec it. It empties the initramfs, makes /newroot the root
    # and execs /sbin/init there.
    exec switch_root /newroot /sbin/init
fi

echo FERROVISOR-GUEST-READY

if [ -n "$count_ms" ]; then
    i=0
    while :; do
        i=$((i + 1))
        echo "count $i"
        # A trap runs only once a foreground command has ended, but it interrupts `wait`.
        usleep $((count_ms * 1000)) &
        wait $!
    done
fi

case "$cmdline" in
*" ferrovisor.shell=1 "*)
    # The shell runs apart from this script, which waits in `wait` so that a shutdown request
    # is taken at once (a trap does not run while sh waits for a foreground command). It is
    # started detached by `setsid setsid`, not with `&`: a background job would have SIGINT
    # ignored, and Ctrl-C would not work in the shell. Its end comes back as SIGUSR1.
    trap 'poweroff -f' USR1
    setsid setsid sh -c \
        'setsid cttyhack sh || sh </dev/console >/dev/console 2>&1; kill -USR1 1'
    while :; do
        sleep 3600 &
        wait $!
    done
    ;;
esac
poweroff -f
EOF
chmod 0755 "$st/init"

python3 "$tool" cpio "$st" "$out/initramfs.cpio.gz"

# ---------------------------------------------------------------- rootfs.ext4
rs="$work/rootfs"
stage_busybox_tree "$rs"
rm -f "$rs/sbin/init"   # busybox's init applet; ours is a script
# Stripped and static: no file names, build paths or time stamps end up in the binary.
gcc -O2 -static -s -o "$rs/usr/bin/vsock-test" "$here/lib/vsock-test.c" ||
    die "cannot build vsock-test (static linking needs libc6-dev: scripts/install-deps.sh)"
chmod 0755 "$rs/usr/bin/vsock-test"
gcc -O2 -static -s -o "$rs/usr/bin/tcp-xfer" "$here/lib/tcp-xfer.c" ||
    die "cannot build tcp-xfer (static linking needs libc6-dev: scripts/install-deps.sh)"
chmod 0755 "$rs/usr/bin/tcp-xfer"
cat >"$rs/sbin/init" <<'EOF'
#!/bin/sh
# Ferrovisor test root file system (scripts/fetch-guest-fixtures.sh). The initramfs switches
# here with ferrovisor.root=DEV, after moving its /dev, /proc and /sys mounts in.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
[ -e /proc/self ] || mount -t proc proc /proc
# Graceful shutdown: the VMM types Ctrl-Alt-Del, which (with ctrl-alt-del at 0, as the
# initramfs left it) the kernel turns into SIGINT for PID 1, this script.
echo 0 >/proc/sys/kernel/ctrl-alt-del
# Leave the file system clean: sync, and remount / read-only unless something holds it busy.
power_off() {
    sync
    mount -o remount,ro / 2>/dev/null
    poweroff -f
}
shutdown_request() {
    echo FERROVISOR-SHUTDOWN
    kill -TERM -1 2>/dev/null
    sleep 0.2
    kill -KILL -1 2>/dev/null
    power_off
}
trap shutdown_request INT
mounted() { grep -q "^[^ ]* $1 " /proc/mounts; }
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mounted /tmp || mount -t tmpfs tmpfs /tmp
cmdline=" $(cat /proc/cmdline) "

echo FERROVISOR-ROOT-READY
echo "root: $(grep ' / ' /proc/mounts | tail -n1)"

case "$cmdline" in
*" ferrovisor.shell=1 "*)
    # As in the initramfs: the shell runs detached, with its signals at their defaults, and
    # this script waits where a shutdown request can interrupt it.
    trap power_off USR1
    setsid setsid sh -c \
        'setsid cttyhack sh || sh </dev/console >/dev/console 2>&1; kill -USR1 1'
    while :; do
        sleep 3600 &
        wait $!
    done
    ;;
esac
power_off
EOF
chmod 0755 "$rs/sbin/init"
python3 "$tool" ext4 "$rs" "$out/rootfs.ext4" "$ROOTFS_SIZE" "$ROOTFS_LABEL" "$ROOTFS_UUID" \
    "$ROOTFS_HASH_SEED" "$ROOTFS_TIME"

printf '%s\n' "$want_version" >"$out/VERSION"
(cd "$out" && sha256sum "${OUTPUTS[@]}" >fixtures.sha256)

# Install atomically per file; fixtures.sha256 last so an interrupted run is detected.
rm -f "$dir/fixtures.sha256"
for f in "${OUTPUTS[@]}" fixtures.sha256; do
    mv -f "$out/$f" "$dir/$f"
done
log "wrote $dir: $kpkg $kver ($krel), busybox $bbver"
(cd "$dir" && ls -l "${OUTPUTS[@]}" fixtures.sha256) >&2
