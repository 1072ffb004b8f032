#!/usr/bin/env python3
"""Run a guest in Ferrovisor's emulator and in QEMU TCG, one instruction at a time, and report
the first instruction address where the two executions diverge.

    scripts/trace-compare.py --kernel KERNEL [--initrd F] [--cmdline S] [--memory 256M]
                             [-n INSTRUCTIONS] [--context 10] [--ferrovisor BIN] [--qemu BIN]

Both runs start the same kernel through the same entry (a PVH ELF is best: QEMU's -kernel
enters it directly; a bzImage goes through QEMU's firmware first). The traces are aligned at
the kernel's first instruction, the entry point both VMMs jump to, then compared address by
address. Ferrovisor's side comes from FERROVISOR_EMU_TRACE=N (one line per instruction);
QEMU's from `-d exec,nochain -singlestep` (one translation block per instruction). Expect the
first divergence at the first interrupt at the latest: the two machines' timers differ.
Consecutive repeats of one address (REP iterations) count once on both sides.
"""
import argparse
import os
import re
import subprocess
import sys

EMU_LINE = re.compile(r"^emu: (0x[0-9a-f]+) (.*)$")
QEMU_LINE = re.compile(r"^Trace \d+: 0x[0-9a-f]+ \[[0-9a-f]+/([0-9a-f]+)/")


def ferrovisor_trace(args, n):
    env = dict(os.environ, FERROVISOR_EMU_TRACE=str(n))
    cmd = [args.ferrovisor, "run", "--backend", "emu", "--deterministic", "--kernel", args.kernel,
           "--memory", args.memory, "--cmdline", args.cmdline]
    if args.initrd:
        cmd += ["--initrd", args.initrd]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    out = []
    # Stop the guest once the trace has what we need: the boot would go on without printing.
    for line in proc.stderr:
        m = EMU_LINE.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
            if len(out) >= n:
                break
    proc.kill()
    proc.wait()
    return out


def qemu_trace(args, n):
    log = "/tmp/ferrovisor-trace-compare-qemu.log"
    cmd = [args.qemu, "-accel", "tcg", "-M", "microvm", "-cpu", "qemu64", "-m", args.memory,
           "-nodefaults", "-no-user-config", "-nographic", "-serial", "null", "-no-reboot",
           "-singlestep", "-d", "exec,nochain", "-D", log, "-kernel", args.kernel,
           "-append", args.cmdline]
    if args.initrd:
        cmd += ["-initrd", args.initrd]
    try:
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=args.qemu_seconds)
    except subprocess.TimeoutExpired:
        pass
    out = []
    with open(log, errors="replace") as f:
        for line in f:
            m = QEMU_LINE.match(line)
            if m:
                out.append(int(m.group(1), 16))
                if len(out) >= 4 * n:
                    break
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd")
    p.add_argument("--cmdline", default="console=ttyS0")
    p.add_argument("--memory", default="256M")
    p.add_argument("-n", type=int, default=200000, help="instructions to compare")
    p.add_argument("--context", type=int, default=10)
    p.add_argument("--ferrovisor", default="target/release/ferrovisor")
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--qemu-seconds", type=int, default=20)
    args = p.parse_args()

    ours = ferrovisor_trace(args, args.n)
    if not ours:
        sys.exit("trace-compare: Ferrovisor produced no trace (is the binary built?)")
    entry = ours[0][0]
    theirs = qemu_trace(args, args.n)
    try:
        start = theirs.index(entry)
    except ValueError:
        sys.exit(f"trace-compare: QEMU never reached the entry point {entry:#x}")
    # A REP string instruction is one step here and one step per iteration in QEMU's
    # single-step mode: compare runs of the same address as one.
    theirs = [a for k, a in enumerate(theirs[start:]) if k == 0 or a != theirs[start + k - 1]]
    ours = [o for k, o in enumerate(ours) if k == 0 or o[0] != ours[k - 1][0]]
    for i, (addr, text) in enumerate(ours):
        if i >= len(theirs):
            print(f"same for all {i} instructions QEMU traced (entry {entry:#x})")
            return 0
        if addr != theirs[i]:
            print(f"first divergence after {i} instructions from the entry {entry:#x}:")
            lo = max(0, i - args.context)
            for k in range(lo, i):
                print(f"  {k:8d}  {ours[k][0]:#018x}  {ours[k][1]}")
            print(f"> {i:8d}  ferrovisor {addr:#018x}  {text}")
            print(f"> {i:8d}  qemu       {theirs[i]:#018x}")
            return 1
    print(f"same for all {len(ours)} instructions compared (entry {entry:#x})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
