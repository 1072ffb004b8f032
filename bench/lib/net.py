#!/usr/bin/env python3
"""Network benchmark harness for bench/net.sh (standard library only; needs root).

Measures TCP throughput between a program on the host and the guest over a tap, for each VM
runner (a command line that boots the test guest with one virtio-net interface on the tap
TAP and the data image as its second disk, /dev/vdb):

  net.py --vm 'ferrovisor::ferrovisor run ... --net tap=fvnbtap0' --vm 'qemu-tcg::qemu ...' \\
      --root-template root.ext4 --root root.ext4 --data data.img --ns-prefix fvnb123- \\
      --rounds 3 --baseline qemu-tcg --log-dir logs

For every boot the harness makes a fresh network namespace (`ip netns add`) holding a tap
(`ip tuntap add ... mode tap vnet_hdr`, 10.0.2.1/24, up), starts the host peer in it
(`net.py peer`, below) and then the VMM in it (`ip netns exec NS COMMAND`, which execs the
VMM, so its pid is the VMM's), and deletes the namespace (and with it the tap) afterwards.
On the serial console it waits for FERROVISOR-ROOT-READY and the shell prompt, gives eth0
the address 10.0.2.15/24, and types one shell line per step:
  warm-up   16 MiB each way (--warmup), unmeasured: guest code paths, translation caches
  preread   `dd if=/dev/vdb of=/dev/null bs=1M`: puts the data image in the guest's page
            cache, so g2h-disk below reads memory, not the virtio disk (timed, not a score;
            the shell holds vdb open from the start, as the kernel drops a block device's
            page cache when its last opener closes it; the sectors read from vdb during
            each step are reported)
  g2h-disk  guest -> host: `tcp-xfer send 10.0.2.1 PORT </dev/vdb` (page-cache reads of
            random data, one copy to user space per byte)
  g2h-zero  guest -> host: `dd if=/dev/zero bs=256k count=N | tcp-xfer send ...` (zeroing
            plus a pipe: two more copies per byte than g2h-disk, in another process)
  h2g       host -> guest: `tcp-xfer recv 10.0.2.1 PORT >/dev/null`
then `exit` (the guest's init syncs and powers off). The score of a step is the host's view:
the peer's bytes over the time from accept() to the last byte (g2h: the last recv() with
data; h2g: the guest's FIN after the peer has sent everything and shut down its side). The
guest's view, bytes over the time between two clock readings around tcp-xfer in the guest's
shell (`date +%s.%N` if the guest's date has %N, else /proc/uptime), is printed next to it.
The peer checks the byte count.

Rounds are interleaved (round 1 of every runner, then round 2, ...) and the runner order
rotates. Prints Markdown tables: min / median / max over the rounds, ratio of medians vs the
baseline; then the host CPU time of each VMM thread during each step (from
/proc/PID/task/*/stat), the peer's CPU, boot times, and the emulator's statistics line if the
VMM printed one (FERROVISOR_EMU_STATS).
"""

import argparse
import json
import os
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

from guestio import ROOT_MARKER, Console, RunError, failed_runs, thread_cpu, thread_report, trip

HOST_IP, GUEST_IP, PREFIX_LEN = "10.0.2.1", "10.0.2.15", 24
TAP = "fvnbtap0"
# Peer ports: guest-to-host (any length), host-to-guest (--size), host-to-guest (--warmup).
P_G2H, P_H2G, P_H2G_WARM = 5001, 5002, 5003

STEPS = [
    # (step, heading)
    ("g2h-disk", "Guest → host, `tcp-xfer send < /dev/vdb` (guest page cache)"),
    ("g2h-zero", "Guest → host, `dd if=/dev/zero bs=256k | tcp-xfer send`"),
    ("h2g", "Host → guest, `tcp-xfer recv > /dev/null`"),
]


def peer_main(argv):
    ap = argparse.ArgumentParser(prog="net.py peer")
    ap.add_argument("--size", type=int, required=True, help="bytes per host-to-guest transfer")
    ap.add_argument("--warm", type=int, required=True, help="bytes per warm-up transfer")
    a = ap.parse_args(argv)
    listeners = {}
    for port in (P_G2H, P_H2G, P_H2G_WARM):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST_IP, port))
        s.listen(1)
        listeners[s.fileno()] = (s, port)
    chunk = 1 << 20
    payload = memoryview(os.urandom(chunk))
    rbuf = bytearray(chunk)
    print("PEER-LISTENING", flush=True)
    while True:
        ready, _, _ = select.select(list(listeners), [], [])
        for fd in ready:
            ls, port = listeners[fd]
            c, _ = ls.accept()
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.monotonic()
            n = 0
            try:
                if port == P_G2H:
                    t_last = t0
                    while True:
                        k = c.recv_into(rbuf)
                        if not k:
                            break
                        n += k
                        t_last = time.monotonic()
                    t1 = t_last
                else:
                    want = a.size if port == P_H2G else a.warm
                    while n < want:
                        k = min(chunk, want - n)
                        c.sendall(payload[:k])
                        n += k
                    c.shutdown(socket.SHUT_WR)
                    while c.recv(1 << 16):
                        pass
                    t1 = time.monotonic()
                err = ""
            except OSError as e:
                t1, err = time.monotonic(), f" error={type(e).__name__}"
            finally:
                c.close()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            print(f"PEER-DONE port={port} bytes={n} secs={t1 - t0:.6f} cpu={cpu:.4f}{err}",
                  flush=True)


# ---------------------------------------------------------------- namespaces

def ip(*args):
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RunError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def make_netns(name):
    ip("netns", "add", name)
    try:
        ip("-n", name, "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")
        ip("-n", name, "addr", "add", f"{HOST_IP}/{PREFIX_LEN}", "dev", TAP)
        ip("-n", name, "link", "set", TAP, "up")
        ip("-n", name, "link", "set", "lo", "up")
    except RunError:
        del_netns(name)
        raise


def del_netns(name):
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


# ---------------------------------------------------------------- VM console

def guest_stat(text):
    """Guest CPU shares (/proc/stat "cpu" line before : after) and sectors read from vdb."""
    try:
        s0, s1, d0, d1 = (part.split() for part in text.split(" : "))
        c0 = [int(x) for x in s0[1:9]]
        c1 = [int(x) for x in s1[1:9]]
        d = [b - a for a, b in zip(c0, c1)]
        total = sum(d) or 1
        # user nice system idle iowait irq softirq steal
        return {"guest_cpu": {"user": (d[0] + d[1]) / total, "sys": d[2] / total,
                              "irq": (d[5] + d[6]) / total, "idle": (d[3] + d[4]) / total},
                "vdb_sectors": int(d1[2]) - int(d0[2])}
    except (ValueError, IndexError):
        return {}


def spawn(argv, log_path, stdin=False):
    out = open(log_path + ".stdout", "wb")
    err = open(log_path + ".stderr", "wb")
    try:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                             bufsize=0)
    except OSError as e:
        out.close()
        err.close()
        raise RunError(f"cannot start {argv[0]}: {e}") from None
    return p, Console(p, out), (out, err)


def stop(p, files):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()
    for f in (p.stdin, p.stdout, *files):
        try:
            if f:
                f.close()
        except OSError:
            pass


def run_vm(name, argv, args, ns, log_path, progress):
    """One boot in the namespace `ns`: returns ({step: result}, extra)."""
    shutil.copyfile(args.root_template, args.root)
    make_netns(ns)
    peer = vm = None
    try:
        peer, pcon, pfiles = spawn(["ip", "netns", "exec", ns, sys.executable,
                                    os.path.abspath(__file__), "peer", "--size", str(args.size),
                                    "--warm", str(args.warmup)], log_path + ".peer")
        pcon.expect(r"PEER-LISTENING\n", 30, "host peer")
        t0 = time.monotonic()
        vm, con, vfiles = spawn(["ip", "netns", "exec", ns, *argv], log_path, stdin=True)
        results, extra = {}, {"cpu": {}, "clock": []}
        _, t = con.expect(re.escape(ROOT_MARKER), args.boot_timeout, ROOT_MARKER)
        extra["boot_s"] = t - t0
        con.expect(r"# ", 60, "shell prompt")
        con.send("stty -echo")
        con.send(f"ip link set eth0 up; ip addr add {GUEST_IP}/{PREFIX_LEN} dev eth0; "
                 "echo NETB-UP $(cat /sys/class/net/eth0/address) $(date +%s.%N)")
        m, _ = con.expect(r"NETB-UP (\S+) (\S+) *\n", 60, "eth0 up")
        extra["mac"] = m.group(1)
        if re.fullmatch(r"\d+\.\d{9}", m.group(2)):
            clock, extra["guest_clock"] = "date +%s.%N", "date +%s.%N"
        else:
            clock, extra["guest_clock"] = "cut -d' ' -f1 /proc/uptime", "/proc/uptime"
        # Hold vdb open for the whole boot: the kernel drops a block device's page cache at
        # its last close, and g2h-disk is to read what preread cached.
        con.send(f"T() {{ {clock}; }}; exec 3</dev/vdb")

        warm_blocks = args.warmup // (256 << 10)
        size_blocks = args.size // (256 << 10)
        send = f"tcp-xfer send {HOST_IP} {P_G2H}"
        steps = [
            ("warm-g2h", f"dd if=/dev/zero bs=256k count={warm_blocks} 2>/dev/null | {send}",
             P_G2H, args.warmup),
            ("warm-h2g", f"tcp-xfer recv {HOST_IP} {P_H2G_WARM} >/dev/null", P_H2G_WARM,
             args.warmup),
            ("preread", "dd if=/dev/vdb of=/dev/null bs=1M 2>/dev/null", None, args.size),
            ("g2h-disk", f"{send} </dev/vdb", P_G2H, args.size),
            ("g2h-zero", f"dd if=/dev/zero bs=256k count={size_blocks} 2>/dev/null | {send}",
             P_G2H, args.size),
            ("h2g", f"tcp-xfer recv {HOST_IP} {P_H2G} >/dev/null", P_H2G, args.size),
        ]
        limit = 60 + args.size / 1e6 * 10   # generous: 0.1 MB/s would fail
        for step, cmd, port, nbytes in steps:
            con.send(f"echo NETB-BEGIN {step}; s0=$(head -n1 /proc/stat); "
                     f"d0=$(cat /sys/block/vdb/stat); a=$(T); {cmd}; rc=$?; b=$(T); "
                     f"s1=$(head -n1 /proc/stat); d1=$(cat /sys/block/vdb/stat); "
                     f"echo NETB-END {step} rc=$rc t0=$a t1=$b; "
                     f"echo NETB-STAT $s0 : $s1 : $d0 : $d1")
            try:
                _, t_begin = con.expect(rf"NETB-BEGIN {step} *\n", 60, f"{step}: start")
            except RunError:
                # Seen a few times in many rounds, cause unknown: the typed line never runs.
                thread_report(vm.pid, log_path + ".threads")
                raise
            cpu0 = thread_cpu(vm.pid)
            m, t_end = con.expect(rf"NETB-END {step} rc=(\d+) t0=(\S+) t1=(\S+) *\n", limit,
                                  f"{step}: end")
            cpu1 = thread_cpu(vm.pid)
            st, _ = con.expect(r"NETB-STAT ([^\n]*)\n", 5, f"{step}: guest statistics")
            if m.group(1) != "0":
                raise RunError(f"{step}: exit status {m.group(1)} in the guest")
            guest_s = float(m.group(3)) - float(m.group(2))
            host_s = t_end - t_begin
            r = {"guest_s": guest_s, "host_console_s": host_s, "bytes": nbytes}
            r.update(guest_stat(st.group(1)))
            if port is not None:
                pm, _ = pcon.expect(r"PEER-DONE port=(\d+) bytes=(\d+) secs=(\S+) cpu=(\S+)(.*)\n",
                                    30, f"{step}: host peer result")
                if int(pm.group(1)) != port or int(pm.group(2)) != nbytes or pm.group(5).strip():
                    raise RunError(f"{step}: the host peer got {pm.group(0).strip()!r}, expected "
                                   f"port={port} bytes={nbytes}")
                r["peer_s"] = float(pm.group(3))
                r["peer_cpu"] = float(pm.group(4)) / r["peer_s"] if r["peer_s"] > 0 else 0.0
                r["MBps"] = nbytes / r["peer_s"] / 1e6
            r["guest_MBps"] = nbytes / guest_s / 1e6 if guest_s > 0 else 0.0
            if host_s > 0:
                r["cpu"] = {c: (v - cpu0.get(c, 0.0)) / host_s for c, v in cpu1.items()
                            if v - cpu0.get(c, 0.0) > 0}
                extra["clock"].append(guest_s / host_s)
            results[step] = r
            if "MBps" in r:
                progress(f"    {step}: {r['MBps']:.1f} MB/s host view, {r['guest_MBps']:.1f} MB/s "
                         f"guest view ({nbytes} bytes in {r['peer_s']:.2f} s)")
            else:
                progress(f"    {step}: {r['guest_MBps']:.1f} MB/s ({guest_s:.2f} s guest)")
        con.send("exit")
        try:
            status = vm.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise RunError("the guest did not power off within 60 s of `exit`") from None
        if status != 0:
            raise RunError(f"VMM exit status {status}")
        vfiles[1].flush()
        with open(log_path + ".stderr", errors="replace") as f:
            stats = [l.strip() for l in f if "MIPS" in l]
        if stats:
            extra["emu_stats"] = stats[-1]
            extra["emu_wall_s"] = time.monotonic() - t0
        return results, extra
    finally:
        if vm is not None:
            stop(vm, vfiles)
        if peer is not None:
            stop(peer, pfiles)
        del_netns(ns)


# ---------------------------------------------------------------- report

def report(samples, order, baseline, args):
    out = []
    mib = args.size >> 20
    for step, heading in STEPS:
        out.append(f"**{heading}** ({mib} MiB per transfer; MB/s = 10^6 bytes/s, higher is better; "
                   f"min / median / max of {args.rounds} rounds; ratio of medians vs `{baseline}`)")
        out.append("")
        out.append(f"| runner | ok | MB/s (host peer) | ratio vs {baseline} | MB/s (guest clock) |")
        out.append("|---|---|---|---|---|")
        base = [s["results"][step]["MBps"] for s in samples.get(baseline, []) if s["ok"]]
        for name in order:
            good = [s for s in samples[name] if s["ok"]]
            vals = [s["results"][step]["MBps"] for s in good]
            gv = [s["results"][step]["guest_MBps"] for s in good]
            if name == baseline:
                ratio = "1.00× (baseline)"
            elif vals and base:
                ratio = f"{statistics.median(vals) / statistics.median(base):.2f}×"
            else:
                ratio = "–"
            out.append(f"| {name} | {len(vals)}/{len(samples[name])} | {trip(vals, '{:.1f}')} "
                       f"| {ratio} | {trip(gv, '{:.1f}')} |")
        out.append("")
    notes, cpu_lines = [], []
    for name in order:
        good = [s for s in samples[name] if s["ok"]]
        if not good:
            continue
        boots = [s["extra"]["boot_s"] for s in good]
        clock = [c for s in good for c in s["extra"]["clock"]]
        pre = [s["results"]["preread"]["guest_MBps"] for s in good]
        clocks = sorted({s["extra"]["guest_clock"] for s in good})
        peer = {st: [s["results"][st]["peer_cpu"] for s in good] for st, _ in STEPS}
        notes.append(
            f"- `{name}`: boot to `{ROOT_MARKER}` {trip(boots, '{:.1f}')} s; guest clock "
            f"({', '.join(clocks)}) / host time per step {trip(clock, '{:.3f}')}; `preread` "
            f"(vdb into the guest page cache) {trip(pre, '{:.0f}')} MB/s; host peer CPU "
            + ", ".join(f"{st} {statistics.median(v) * 100:.0f}%" for st, v in peer.items()))
        stats = [s["extra"]["emu_stats"] for s in good if "emu_stats" in s["extra"]]
        if stats:
            notes.append(f"  - emulator, whole run (boot included), last round: {stats[-1]}")
        parts = []
        for step, _ in STEPS:
            per = {}
            for s in good:
                for comm, v in s["results"][step].get("cpu", {}).items():
                    per.setdefault(comm, []).append(v)
            top = sorted(((statistics.median(v), c) for c, v in per.items()), reverse=True)
            top = [f"{c} {v * 100:.0f}%" for v, c in top if v >= 0.02][:4]
            parts.append(f"{step}: {', '.join(top) or '–'}")
        cpu_lines.append(f"- `{name}`: " + "; ".join(parts))
    guest_lines = []
    for name in order:
        good = [s for s in samples[name] if s["ok"]]
        parts = []
        for step, _ in STEPS:
            gc = [s["results"][step]["guest_cpu"] for s in good
                  if "guest_cpu" in s["results"][step]]
            if not gc:
                continue
            med = {k: statistics.median(g[k] for g in gc) * 100 for k in gc[0]}
            vdb = statistics.median(s["results"][step].get("vdb_sectors", 0) for s in good)
            parts.append(f"{step}: user {med['user']:.0f}%, sys {med['sys']:.0f}%, irq+softirq "
                         f"{med['irq']:.0f}%, idle {med['idle']:.0f}%, {vdb * 512 / 1e6:.0f} MB "
                         "read from vdb")
        if parts:
            guest_lines.append(f"- `{name}`: " + "; ".join(parts))
    if notes:
        out.append("VM runs (not part of the scores):")
        out.extend(notes)
        out.append("")
    if cpu_lines:
        out.append("Host CPU time of the VMM's threads during each step, by thread name (median "
                   "over the rounds, share of one CPU; threads under 2 % left out):")
        out.extend(cpu_lines)
        out.append("")
    if guest_lines:
        out.append("The guest's view of its CPU during each step (/proc/stat in the guest, median "
                   "over the rounds):")
        out.extend(guest_lines)
        out.append("")
    out.extend(failed_runs(samples, order))
    return "\n".join(out).rstrip() + "\n"


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        peer_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vm", action="append", default=[], metavar="NAME::COMMAND")
    ap.add_argument("--root-template", required=True, help="the root image to copy per boot")
    ap.add_argument("--root", required=True, help="where the copy goes (the path the VM "
                                                  "commands use)")
    ap.add_argument("--data", required=True, help="the data image (the guests' vdb)")
    ap.add_argument("--ns-prefix", required=True, help="namespaces are named PREFIX<runner>")
    ap.add_argument("--rounds", "-n", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=16 << 20, help="bytes per warm-up transfer")
    ap.add_argument("--baseline", default="qemu-tcg")
    ap.add_argument("--boot-timeout", type=float, default=180.0)
    ap.add_argument("--log-dir", required=True)
    ap.add_argument("--json", help="write all samples here")
    ap.add_argument("--quiet", "-q", action="store_true")
    a = ap.parse_args()
    a.size = os.path.getsize(a.data)
    if a.size % (256 << 10) or a.warmup % (256 << 10) or a.warmup <= 0:
        ap.error("the data image and --warmup must be multiples of 256 KiB")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces and taps)")

    runners = []
    for spec in a.vm:
        name, sep, cmd = spec.partition("::")
        if not sep or not name or not cmd:
            ap.error(f"--vm wants NAME::COMMAND, got {spec!r}")
        runners.append((name, shlex.split(cmd)))
    names = [r[0] for r in runners]
    if not runners or len(set(names)) != len(names):
        ap.error("at least one runner, unique names")
    os.makedirs(a.log_dir, exist_ok=True)

    def progress(msg):
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    samples = {n: [] for n in names}
    for rnd in range(a.rounds):
        k = rnd % len(runners)
        for name, argv in runners[k:] + runners[:k]:
            progress(f"net: round {rnd + 1}/{a.rounds}: {name}")
            log = os.path.join(a.log_dir, f"{name}.round{rnd + 1}")
            t = time.monotonic()
            try:
                res, extra = run_vm(name, argv, a, a.ns_prefix + name, log, progress)
                samples[name].append({"ok": True, "results": res, "extra": extra})
                progress(f"    ({time.monotonic() - t:.1f} s)")
            except (RunError, subprocess.TimeoutExpired, OSError) as e:
                samples[name].append({"ok": False, "reason": str(e), "extra": {}})
                progress(f"    FAILED: {e} (output in {log}.*)")

    base = a.baseline if a.baseline in names else names[-1]
    print(report(samples, names, base, a), end="")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rounds": a.rounds, "baseline": base, "size": a.size,
                       "runners": {n: shlex.join(v) for n, v in runners},
                       "samples": samples}, f, indent=1)
    sys.exit(0 if all(s["ok"] for ss in samples.values() for s in ss) else 1)


if __name__ == "__main__":
    main()
