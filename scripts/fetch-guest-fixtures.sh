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
#   VERSION            KEY=VALUE: kernel package, version, release; busybox version
#   fixtures.sha256    sha256sum of the above
#
# The initramfs /init mounts proc, sys, devtmpfs and tmpfs, prints FERROVISOR-GUEST-READY
# on the console and runs `poweroff -f`. Kernel command line switches:
#   ferrovisor.modules=1   insmod the virtio modules (lib/modules/<release>/modules.load)
#                          before the marker
#   ferrovisor.shell=1     after the marker, an interactive shell on the console instead
#                          of powering off (poweroff -f when the shell exits)
#
# Fast when nothing changed: if the outputs exist, verify against fixtures.sha256 and VERSION
# names the kernel package apt currently resolves, it exits at once. --force rebuilds;
# --update runs `apt-get update` first (otherwise only when a package cannot be found or
# downloaded).
set -euo pipefail

# Bump when the content of the outputs changes for the same packages (init script, layout).
FIXTURE_FORMAT=1
META_PKG=linux-image-cloud-amd64
BUSYBOX_PKG=busybox-static
MODULES=(virtio virtio_ring virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev
         virtio_blk virtio_net net_failover failover virtio_mmio virtio_console virtio_rng
         vmw_vsock_virtio_transport vmw_vsock_virtio_transport_common vsock virtio_balloon
         ext4 jbd2 mbcache crc16 crc32c_generic)
OUTPUTS=(vmlinuz vmlinux initramfs.cpio.gz VERSION)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
tool="$here/lib/fixture_tool.py"

force=0 update=0 dir=
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --update) update=1 ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fetch-guest-fixtures: unknown option: $arg" >&2; exit 2 ;;
        *) [ -z "$dir" ] || { echo "fetch-guest-fixtures: more than one DIR" >&2; exit 2; }
           dir=$arg ;;
    esac
done
dir=${dir:-$repo/fixtures}

log() { echo "fetch-guest-fixtures: $*" >&2; }
die() { echo "fetch-guest-fixtures: ERROR: $*" >&2; exit 1; }

for cmd in apt-get apt-cache dpkg-deb python3 sha256sum lz4; do
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
    want_version="FIXTURE_FORMAT=$FIXTURE_FORMAT
KERNEL_PACKAGE=$kpkg
KERNEL_VERSION=$kver
KERNEL_RELEASE=$krel
BUSYBOX_VERSION=$bbver"
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

# ---------------------------------------------------------------- initramfs
st="$work/stage"
mkdir -p "$st"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc,lib/modules}
chmod 1777 "$st/tmp"
chmod 0700 "$st/root"
cp "$busybox" "$st/bin/busybox"
chmod 0755 "$st/bin/busybox"
# Every applet, where busybox itself would install it (bin/sh, sbin/poweroff, ...).
"$busybox" --list-full | while read -r path; do
    [ "$path" != bin/busybox ] || continue
    case "$path" in
        bin/*) target=busybox ;;
        sbin/*) target=../bin/busybox ;;
        usr/bin/*|usr/sbin/*) target=../../bin/busybox ;;
        *) continue ;;
    esac
    [ -e "$st/$path" ] || ln -s "$target" "$st/$path"
done
for need in sh mount mkdir cat echo poweroff setsid cttyhack insmod modprobe; do
    [ -e "$st/bin/$need" ] || [ -e "$st/sbin/$need" ] || [ -e "$st/usr/bin/$need" ] ||
        [ -e "$st/usr/sbin/$need" ] ||
        die "busybox $bbver lacks the '$need' applet"
done

python3 "$tool" modules "$modroot" "$st/lib/modules/$krel" "${MODULES[@]}"

cat >"$st/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
cat >"$st/etc/group" <<'EOF'
root:x:0:
EOF

cat >"$st/init" <<'EOF'
#!/bin/sh
# Ferrovisor test initramfs (scripts/fetch-guest-fixtures.sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
cmdline=" $(cat /proc/cmdline) "

case "$cmdline" in
*" ferrovisor.modules=1 "*)
    moddir=/lib/modules/$(uname -r)
    while read -r m; do
        insmod "$moddir/$m" || echo "init: insmod $m failed"
    done <"$moddir/modules.load"
    ;;
esac

echo FERROVISOR-GUEST-READY

case "$cmdline" in
*" ferrovisor.shell=1 "*)
    setsid cttyhack sh || sh </dev/console >/dev/console 2>&1
    ;;
esac
poweroff -f
EOF
chmod 0755 "$st/init"

python3 "$tool" cpio "$st" "$out/initramfs.cpio.gz"

printf '%s\n' "$want_version" >"$out/VERSION"
(cd "$out" && sha256sum "${OUTPUTS[@]}" >fixtures.sha256)

# Install atomically per file; fixtures.sha256 last so an interrupted run is detected.
rm -f "$dir/fixtures.sha256"
for f in "${OUTPUTS[@]}" fixtures.sha256; do
    mv -f "$out/$f" "$dir/$f"
done
log "wrote $dir: $kpkg $kver ($krel), busybox $bbver"
(cd "$dir" && ls -l "${OUTPUTS[@]}" fixtures.sha256) >&2
