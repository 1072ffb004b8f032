#!/usr/bin/env python3
"""What one guest I/O costs the emulator, counted instead of timed (driven by bench/emu-cost.sh).

Wall-time benchmarks on these shared hosts move by 20 % between identical runs; an
optimisation of the interpreter worth 5 % drowns in that. This harness counts instead:

  1. one VMM (the first --ferrovisor) boots the Debian guest on `emu` in deterministic mode
     (guest time is the instruction count) to a shell, and the VM is paused and snapshotted;
  2. each VMM binary restores that snapshot under Valgrind's cachegrind, with a blkbench
     command queued on the serial console (--console-input), twice per test with two request
     counts (--small, --large); each run ends with `poweroff -f`;
  3. the difference between the two runs, divided by the difference in requests, is what one
     request costs: guest instructions and blocks (FERROVISOR_EMU_STATS), host instructions,
     first-level cache misses (cachegrind's simulation of this host's L1). Start-up,
     restore, the compiles of a cold block cache and the power-off cancel out.

The guest runs the same instructions on every run (deterministic mode, same snapshot, same
input), so two binaries compare exactly: same guest work, different host work.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

from guestio import ROOT_MARKER, Console, RunError

CMDLINE = "console=ttyS0 panic=-1 quiet ferrovisor.root=/dev/vda ferrovisor.shell=1"
# Test name -> blkbench arguments before the request count, and bytes per request.
TESTS = {
    "randread": ("randread /dev/vdb -b 4096", 4096),
    "seqread": ("seqread /dev/vdb -b 1048576", 1 << 20),
}
STATS = re.compile(r"retired (\d+) instructions .*?; (\d+) blocks run, (\d+) compiled")
RESULT = re.compile(r"BLKBENCH mode=\S+ bs=\d+ direct=1 ops=(\d+)")


def snapshot(args, work):
    """Boots the guest to its shell in deterministic mode and snapshots it; returns the
    snapshot directory."""
    sock = os.path.join(work, "api.sock")
    snap = os.path.join(work, "snapshot")
    argv = [args.ferrovisor[0], "run", "--backend", "emu", "--deterministic", "--api-sock", sock,
            "--kernel", args.kernel, "--initrd", args.initrd, "--memory", "512M",
            "--cmdline", CMDLINE, "--disk", f"path={args.root}",
            "--disk", f"path={args.image},ro=on"]
    with open(os.path.join(work, "boot.log"), "wb") as log:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        try:
            con = Console(p, log)
            con.expect(ROOT_MARKER, 180, "boot to the root file system")
            # The prompt: an echo whose output differs from its command line.
            con.send("echo SHELL-$((40+2))")
            con.expect(r"^SHELL-42$", 60, "the shell")
            ctl = [args.ferrovisor[0], "ctl", "--sock", sock]
            subprocess.run(ctl + ["pause"], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(ctl + ["snapshot", snap], check=True, stdout=subprocess.DEVNULL)
        finally:
            p.kill()
            p.wait()
    # Every binary compiles its own blocks, as a VM booted by it would. With the compiled code
    # the snapshot saved, a binary of the same build would run those blocks the way clones do
    # (each checked before first use, saved chains left as they are), which costs more per
    # request than the usual path this measures.
    for name in os.listdir(snap):
        if name.startswith("code-"):
            os.remove(os.path.join(snap, name))
    return snap


def count(args, work, snap, binary, test, ops):
    """One restore under cachegrind running `ops` requests of `test`; returns the counts."""
    tag = f"{os.path.basename(binary)}-{test}-{ops}"
    cmd, bs = TESTS[test]
    inp = os.path.join(work, f"{tag}.in")
    with open(inp, "w") as f:
        f.write(f"blkbench {cmd} -s {ops * bs}; poweroff -f\n")
    root = os.path.join(work, f"{tag}.ext4")
    shutil.copyfile(args.root, root)
    out = os.path.join(work, f"{tag}.cachegrind")
    # The emulator translates hot blocks to host code at run time: Valgrind must watch for it.
    argv = ["valgrind", "--tool=cachegrind", "--cache-sim=yes", "--smc-check=all-non-file",
            f"--cachegrind-out-file={out}",
            binary, "run", "--restore", snap, "--console-input", inp,
            "--disk", f"path={root}", "--disk", f"path={args.image},ro=on"]
    env = dict(os.environ, FERROVISOR_EMU_STATS="1")
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=args.timeout)
    text = r.stdout.decode("latin-1")
    with open(os.path.join(work, f"{tag}.log"), "w") as f:
        f.write(text)
    os.unlink(root)
    done = RESULT.search(text)
    stats = STATS.search(text)
    if r.returncode != 0 or not done or not stats:
        raise RunError(f"{tag}: no blkbench result or emulator statistics (exit {r.returncode}); "
                       f"log in {work}/{tag}.log")
    if int(done.group(1)) != ops:
        raise RunError(f"{tag}: blkbench did {done.group(1)} requests, not {ops}")

    def total(label):
        m = re.search(label + r":\s+([\d,]+)", text)
        if not m:
            raise RunError(f"{tag}: no '{label}' line from cachegrind")
        return int(m.group(1).replace(",", ""))

    return {
        "guest instructions": int(stats.group(1)),
        "blocks entered": int(stats.group(2)),
        "host instructions": total("I   refs"),
        "L1 instruction misses": total("I1  misses"),
        "L1 data misses": total("D1  misses"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ferrovisor", action="append", required=True,
                    help="VMM binary; repeat to compare (the first also makes the snapshot: "
                         "put the oldest first)")
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--root", required=True, help="root image with /usr/bin/blkbench")
    ap.add_argument("--image", required=True, help="test image (the guest's /dev/vdb)")
    ap.add_argument("--tests", default="randread,seqread")
    ap.add_argument("--small", type=int, default=256, help="requests in the short run")
    ap.add_argument("--large", type=int, default=1024, help="requests in the long run")
    ap.add_argument("--seq-divisor", type=int, default=32,
                    help="seqread runs small/N and large/N requests (each is 256 pages)")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--work", help="directory for the snapshot and logs (default: a new one)")
    args = ap.parse_args()
    tests = args.tests.split(",")
    for t in tests:
        if t not in TESTS:
            ap.error(f"unknown test {t} (tests: {', '.join(TESTS)})")
    if not 0 < args.small < args.large:
        ap.error("--small must be positive and below --large")
    work = args.work or tempfile.mkdtemp(prefix="emu-cost.")
    try:
        snap = snapshot(args, work)
        rows = {}
        for test in tests:
            div = args.seq_divisor if test == "seqread" else 1
            small, large = max(1, args.small // div), max(2, args.large // div)
            for binary in args.ferrovisor:
                a = count(args, work, snap, binary, test, small)
                b = count(args, work, snap, binary, test, large)
                rows[(test, binary)] = {k: (b[k] - a[k]) / (large - small) for k in a}
                print(f"emu-cost: {test} {binary} done", file=sys.stderr)
    except (RunError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"emu-cost: {e}", file=sys.stderr)
        print(f"emu-cost: logs are in {work}", file=sys.stderr)
        return 1
    base = args.ferrovisor[0]
    for test in tests:
        unit = "4 KiB random read" if test == "randread" else "1 MiB sequential read"
        print(f"\n### {test}: per {unit} (O_DIRECT, queue depth 1)\n")
        head = "| metric | " + " | ".join(args.ferrovisor) + " |"
        print(head)
        print("|---" * (len(args.ferrovisor) + 1) + "|")
        for metric in rows[(test, base)]:
            cells = []
            for binary in args.ferrovisor:
                v = rows[(test, binary)][metric]
                cell = f"{v:,.0f}"
                if binary != base and rows[(test, base)][metric]:
                    cell += f" ({v / rows[(test, base)][metric]:.3f}×)"
                cells.append(cell)
            print(f"| {metric} | " + " | ".join(cells) + " |")
        g = rows[(test, base)]["guest instructions"]
        cells = [f"{rows[(test, b)]['host instructions'] / g:.1f}" for b in args.ferrovisor]
        print("| host instructions per guest instruction | " + " | ".join(cells) + " |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
