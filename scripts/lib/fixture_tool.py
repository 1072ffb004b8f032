#!/usr/bin/env python3
"""Helpers for scripts/fetch-guest-fixtures.sh (standard library only).

  fixture_tool.py extract-vmlinux BZIMAGE OUT
      Find the compressed kernel inside a bzImage and write the uncompressed ELF to OUT.
  fixture_tool.py modules MODROOT STAGE_MODDIR NAME...
      Copy the named modules and everything they depend on (modinfo "depends=") from
      MODROOT (an unpacked /lib/modules/<release>) to STAGE_MODDIR, and write modules.dep,
      modules.order-style load list "modules.load" (dependencies first) and copy
      modules.builtin/modules.order. Names that are built in are reported, not an error.
  fixture_tool.py cpio STAGEDIR OUT.cpio.gz
      Pack STAGEDIR as a newc cpio (owner root, fixed mtime, sorted, with /dev/console and
      /dev/null device nodes added) and gzip it reproducibly.
  fixture_tool.py ext4 STAGEDIR OUT SIZE LABEL UUID HASH_SEED EPOCH
      Make OUT an ext4 image of SIZE (bytes, or with a K/M/G suffix) holding STAGEDIR
      (mkfs.ext4 -d), every inode owned by root and stamped EPOCH, with the given label, UUID
      and directory hash seed: the same tree gives the same bytes. Checked with e2fsck -fn.
"""

import gzip
import lzma
import bz2
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib

MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


def die(msg):
    print(f"fixture_tool: error: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------- vmlinux extraction

def _elf_complete(data):
    """True if data is an ELF64 image whose section header table fits inside data."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    e_phoff, e_shoff = struct.unpack_from("<QQ", data, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", data, 0x36)
    end = max(e_phoff + e_phentsize * e_phnum, e_shoff + e_shentsize * e_shnum)
    return end <= len(data)


def _py_gzip(blob):
    d = zlib.decompressobj(wbits=31)
    return d.decompress(blob)


def _py_xz(blob):
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)


def _py_lzma(blob):
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(blob)


def _py_bzip2(blob):
    return bz2.BZ2Decompressor().decompress(blob)


def _cli(argv):
    def run(blob):
        if shutil.which(argv[0]) is None:
            raise RuntimeError(f"{argv[0]} not installed (scripts/install-deps.sh)")
        # Trailing bytes after the stream (the kernel appends the uncompressed size) make
        # some tools exit non-zero after writing everything; judge by the output instead.
        p = subprocess.run(argv, input=blob, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return p.stdout
    return run


# (name, magic, decompressor)
FORMATS = [
    ("xz", b"\xfd7zXZ\x00", _py_xz),
    ("zstd", b"\x28\xb5\x2f\xfd", _cli(["zstd", "-dcq"])),
    ("gzip", b"\x1f\x8b\x08", _py_gzip),
    ("lz4", b"\x02\x21\x4c\x18", _cli(["lz4", "-dcq"])),
    ("lzma", b"\x5d\x00\x00", _py_lzma),
    ("bzip2", b"BZh", _py_bzip2),
]
MAX_CANDIDATES_PER_FORMAT = 64


def extract_vmlinux(src, dst):
    img = open(src, "rb").read()
    if img[:4] == b"\x7fELF":
        die(f"{src} is already an ELF, not a bzImage")
    if img[0x202:0x206] != b"HdrS":
        print(f"fixture_tool: warning: {src} has no Linux boot header; scanning anyway",
              file=sys.stderr)

    # Candidate offsets: scan the whole image for every format's magic. The boot header's
    # payload_offset (protocol >= 2.08) is tried first when present, since it is exact.
    hinted = None
    if img[0x202:0x206] == b"HdrS" and struct.unpack_from("<H", img, 0x206)[0] >= 0x208:
        setup_sects = img[0x1f1] or 4
        hinted = (setup_sects + 1) * 512 + struct.unpack_from("<I", img, 0x248)[0]

    candidates = []
    for name, magic, fn in FORMATS:
        pos, n = img.find(magic), 0
        while pos != -1 and n < MAX_CANDIDATES_PER_FORMAT:
            candidates.append((0 if pos == hinted else 1, pos, name, fn))
            pos, n = img.find(magic, pos + 1), n + 1
    candidates.sort(key=lambda c: (c[0], c[1]))

    for _, pos, name, fn in candidates:
        try:
            out = fn(img[pos:])
        except Exception:  # noqa: BLE001 - a false-positive magic is expected to fail
            continue
        if out[:4] == b"\x7fELF":
            if not _elf_complete(out):
                print(f"fixture_tool: {name} at {pos:#x}: ELF truncated, trying next",
                      file=sys.stderr)
                continue
            tmp = dst + ".tmp"
            with open(tmp, "wb") as f:
                f.write(out)
            os.replace(tmp, dst)
            print(f"fixture_tool: vmlinux: {name} payload at offset {pos:#x}, "
                  f"{len(out)} bytes", file=sys.stderr)
            return
    die(f"no compressed ELF payload found in {src} "
        f"(tried {len(candidates)} candidates: {', '.join(f[0] for f in FORMATS)})")


# ---------------------------------------------------------------- modules

def _modinfo(path):
    """Return the .modinfo section of a kernel module as a dict of lists."""
    data = open(path, "rb").read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        die(f"{path}: not an ELF64 module (compressed modules are not supported)")
    e_shoff = struct.unpack_from("<Q", data, 0x28)[0]
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3a)

    def sh(i):
        return struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)

    strtab = sh(e_shstrndx)
    names = data[strtab[4]:strtab[4] + strtab[5]]
    info = {}
    for i in range(e_shnum):
        s = sh(i)
        nm = names[s[0]:names.index(b"\0", s[0])]
        if nm == b".modinfo":
            for item in data[s[4]:s[4] + s[5]].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    info.setdefault(k, []).append(v)
    return info


def _modname(filename):
    base = os.path.basename(filename)
    for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base.replace("-", "_")


def modules(modroot, stage, names):
    index = {}
    for dirpath, _, files in os.walk(os.path.join(modroot, "kernel")):
        for f in files:
            if f.endswith(".ko"):
                rel = os.path.relpath(os.path.join(dirpath, f), modroot)
                index[_modname(f)] = rel
    builtin = set()
    bpath = os.path.join(modroot, "modules.builtin")
    if os.path.exists(bpath):
        builtin = {_modname(l.strip()) for l in open(bpath) if l.strip()}

    deps = {}  # name -> list of dep names
    order = []  # topological: dependencies first

    def visit(name, chain):
        if name in deps:
            return
        if name in chain:
            die(f"module dependency cycle: {' -> '.join(chain + [name])}")
        info = _modinfo(os.path.join(modroot, index[name]))
        ds = [d.replace("-", "_") for v in info.get("depends", []) for d in v.split(",") if d]
        for d in ds:
            if d not in index:
                die(f"{name} depends on {d}, which is not in the package")
            visit(d, chain + [name])
        deps[name] = ds
        order.append(name)

    for raw in names:
        name = raw.replace("-", "_")
        if name in index:
            visit(name, [])
        elif name in builtin:
            print(f"fixture_tool: module {name}: built into the kernel", file=sys.stderr)
        else:
            die(f"module {name}: neither a module in the package nor built in")

    # Full transitive closure for modules.dep (depmod lists all, nearest first).
    def closure(name, acc):
        for d in deps[name]:
            if d not in acc:
                acc.append(d)
                closure(d, acc)
        return acc

    os.makedirs(stage, exist_ok=True)
    for name in order:
        dst = os.path.join(stage, index[name])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(modroot, index[name]), dst)
    with open(os.path.join(stage, "modules.dep"), "w") as f:
        for name in sorted(order, key=lambda n: index[n]):
            f.write(f"{index[name]}: {' '.join(index[d] for d in closure(name, []))}".rstrip()
                    + "\n")
    with open(os.path.join(stage, "modules.load"), "w") as f:
        for name in order:
            f.write(index[name] + "\n")
    for extra in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
        p = os.path.join(modroot, extra)
        if os.path.exists(p):
            shutil.copyfile(p, os.path.join(stage, extra))
    print(f"fixture_tool: {len(order)} modules: {' '.join(order)}", file=sys.stderr)


# ---------------------------------------------------------------- cpio

def _cpio_entry(out, ino, name, mode, nlink, data=b"", rdev=(0, 0)):
    namez = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08x}" for v in (
        ino, mode, 0, 0, nlink, MTIME, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0))
    out.write(hdr.encode() + namez)
    out.write(b"\0" * ((4 - (110 + len(namez)) % 4) % 4))
    out.write(data)
    out.write(b"\0" * ((4 - len(data) % 4) % 4))


def pack_cpio(stagedir, dst):
    entries = []
    for dirpath, dirs, files in os.walk(stagedir):
        dirs.sort()
        for n in dirs + files:
            entries.append(os.path.relpath(os.path.join(dirpath, n), stagedir))
    specials = {"dev/console": (stat.S_IFCHR | 0o600, (5, 1)),
                "dev/null": (stat.S_IFCHR | 0o666, (1, 3))}
    entries = sorted(set(entries) | set(specials))

    raw = open(dst + ".cpio.tmp", "wb")
    try:
        ino = 1
        for rel in entries:
            ino += 1
            if rel in specials:
                mode, rdev = specials[rel]
                _cpio_entry(raw, ino, rel, mode, 1, rdev=rdev)
                continue
            p = os.path.join(stagedir, rel)
            st = os.lstat(p)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                _cpio_entry(raw, ino, rel, stat.S_IFDIR | perm, 2)
            elif stat.S_ISLNK(st.st_mode):
                _cpio_entry(raw, ino, rel, stat.S_IFLNK | 0o777, 1, os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                _cpio_entry(raw, ino, rel, stat.S_IFREG | perm, 1, open(p, "rb").read())
            else:
                die(f"unsupported file type in staging dir: {rel}")
        _cpio_entry(raw, 0, "TRAILER!!!", 0, 1)
    finally:
        raw.close()
    with open(dst + ".cpio.tmp", "rb") as src, open(dst + ".tmp", "wb") as fo:
        # mtime=0 and no file name in the gzip header: same input, same bytes.
        with gzip.GzipFile(filename="", mode="wb", fileobj=fo, compresslevel=9, mtime=0) as gz:
            shutil.copyfileobj(src, gz)
    os.unlink(dst + ".cpio.tmp")
    os.replace(dst + ".tmp", dst)


# ---------------------------------------------------------------- ext4 image

def _parse_size(text):
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    num, unit = text.rstrip("KMGkmg"), text[len(text.rstrip("KMGkmg")):].upper()
    if not num.isdigit() or unit not in units:
        die(f"bad size {text!r} (bytes, or a number with K, M or G)")
    return int(num) * units[unit]


def _run(argv, what, **kw):
    if shutil.which(argv[0]) is None:
        die(f"{argv[0]} not found (e2fsprogs; scripts/install-deps.sh)")
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode != 0:
        die(f"{what} failed (exit {p.returncode}):\n{p.stdout}{p.stderr}")
    return p


def make_ext4(stagedir, dst, size, label, uuid, hash_seed, epoch):
    epoch = int(epoch)
    if epoch <= 0:
        die("ext4: EPOCH must be positive (mke2fs ignores E2FSPROGS_FAKE_TIME=0)")
    # mke2fs -d copies atime and mtime from the tree, so fix them there. It copies ctime too,
    # which user space cannot set, and the owner of the files: debugfs rewrites both below.
    # E2FSPROGS_FAKE_TIME is the time mke2fs and debugfs use for everything else (superblock
    # times, crtime, the root and lost+found directories).
    paths = ["/", "/lost+found"]
    ns = epoch * 1_000_000_000
    for dirpath, dirs, files in os.walk(stagedir):
        dirs.sort()
        for n in sorted(dirs + files):
            p = os.path.join(dirpath, n)
            rel = "/" + os.path.relpath(p, stagedir)
            if any(c in rel for c in ' "\\\t\n'):
                die(f"ext4: file name needs quoting in debugfs, not supported: {rel!r}")
            if rel == "/lost+found":
                die("ext4: the staging tree must not have /lost+found (mke2fs makes it)")
            paths.append(rel)
    # Directories last so that their times are not disturbed by stamping their entries.
    for dirpath, dirs, files in os.walk(stagedir, topdown=False):
        for n in dirs + files:
            os.utime(os.path.join(dirpath, n), ns=(ns, ns), follow_symlinks=False)
    os.utime(stagedir, ns=(ns, ns))

    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(epoch))
    tmp = dst + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    with open(tmp, "wb") as f:
        f.truncate(_parse_size(size))
    # Block and inode size pinned: mke2fs.conf would pick 1 KiB blocks for a "small" image.
    _run(["mkfs.ext4", "-F", "-q", "-t", "ext4", "-b", "4096", "-I", "256", "-L", label,
          "-U", uuid, "-E", f"root_owner=0:0,hash_seed={hash_seed}", "-d", stagedir, tmp],
         "mkfs.ext4", env=env)

    cmds = tmp + ".debugfs"
    with open(cmds, "w") as f:
        for p in paths:
            f.write(f'sif "{p}" ctime @{epoch}\nsif "{p}" uid 0\nsif "{p}" gid 0\n')
    p = _run(["debugfs", "-w", "-f", cmds, tmp], "debugfs", env=env)
    os.unlink(cmds)
    # debugfs exits 0 whatever its commands did; anything on stderr but its banner is an error.
    errors = [l for l in p.stderr.splitlines() if l.strip() and not l.startswith("debugfs ")]
    if errors:
        die("debugfs: " + "\n".join(errors[:10]))
    _run(["e2fsck", "-fn", tmp], "e2fsck -fn on the new image", env=env)
    os.replace(tmp, dst)
    print(f"fixture_tool: ext4: {dst}: {size}, {len(paths)} inodes stamped {epoch}, "
          f"UUID {uuid}", file=sys.stderr)


def main(argv):
    if len(argv) >= 3 and argv[0] == "extract-vmlinux":
        extract_vmlinux(argv[1], argv[2])
    elif len(argv) >= 3 and argv[0] == "modules":
        modules(argv[1], argv[2], argv[3:])
    elif len(argv) == 3 and argv[0] == "cpio":
        pack_cpio(argv[1], argv[2])
    elif len(argv) == 8 and argv[0] == "ext4":
        make_ext4(*argv[1:])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
