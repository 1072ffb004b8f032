#!/usr/bin/env python3
"""Block-device benchmark harness for bench/blk.sh (standard library only).

Runs bench/lib/blkbench (a static binary) against one raw test image, through each runner:
  - a VM runner boots a guest whose root file system (a copy of --root-template, refreshed
    before every boot) holds /usr/bin/blkbench, waits for FERROVISOR-ROOT-READY and the shell
    prompt on the serial console (stdout), types one blkbench command per test against the
    guest's second disk (/dev/vdb), reads the result lines, then types `exit` (the guest's
    init syncs, remounts / read-only and powers off);
  - a host runner runs the same blkbench on the host against the image file itself:
    `direct` with O_DIRECT, `cached` without (the image is in the host's page cache, which
    is where both VMMs read it from and write it to).

  blk.py --image test.img --blkbench build/blkbench --root-template root.ext4 --root root.ext4 \\
      --vm 'ferrovisor::ferrovisor run ... --disk path=root.ext4 --disk path=test.img' \\
      --host host-direct::direct --rounds 3 --baseline qemu-tcg

Tests, in this order in every run: seqread (1 MiB requests, O_DIRECT), randread (4 KiB at
random 4 KiB-aligned offsets, O_DIRECT, queue depth 1), seqwrite (1 MiB, O_DIRECT). The
sequential tests run for --secs (wrapping round at the end of the image; --seq-bytes can stop
them earlier), randread for --rand-secs, each after --warmup seconds of the same loop
unmeasured. Rounds are interleaved (round 1 of every runner, then round 2, ...), and the
order of the runners rotates from round to round. Before each runner that goes through the
host page cache the image is read once (an O_DIRECT writer drops the cached pages); after each
runner it is fsynced, so one runner's dirty pages are not written back during the next.

Prints one Markdown table per metric: min / median / max over the rounds and the ratio of
medians against the baseline. For VM runners it also checks the guest's clock: the host's
time between blkbench's BEGIN line and its result line, against the time the guest reports.
"""

import argparse
import json
import os
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

from guestio import ROOT_MARKER, Console, RunError, failed_runs, thread_cpu, trip

GUEST_BLKBENCH = "/usr/bin/blkbench"
GUEST_DEV = "/dev/vdb"

METRICS = [
    # (test, key in the result line, heading, unit)
    ("seqread", "MiBps", "Sequential read, 1 MiB requests, O_DIRECT", "MiB/s"),
    ("seqwrite", "MiBps", "Sequential write, 1 MiB requests, O_DIRECT", "MiB/s"),
    ("randread", "iops", "Random read, 4 KiB requests, O_DIRECT, queue depth 1", "IOPS"),
]


def parse_kv(line):
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def test_args(args):
    """The blkbench arguments (after MODE PATH) of each test, in run order."""
    warm = ["-w", f"{args.warmup:g}"]
    seq = ["-b", "1M", "-s", str(args.seq_bytes), "-t", f"{args.secs:g}"] + warm
    return [("seqread", seq), ("randread", ["-b", "4K", "-t", f"{args.rand_secs:g}"] + warm),
            ("seqwrite", seq)]


def run_vm(argv, args, log_path, progress):
    """One boot: returns ({test: result dict}, extra dict)."""
    shutil.copyfile(args.root_template, args.root)
    log = open(log_path + ".stdout", "wb")
    err = open(log_path + ".stderr", "wb")
    t0 = time.monotonic()
    try:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                             start_new_session=True, bufsize=0)
    except OSError as e:
        log.close()
        err.close()
        raise RunError(f"cannot start: {e}") from None
    con = Console(p, log)
    results, extra = {}, {"clock": [], "cpu": {}}
    try:
        _, t = con.expect(re.escape(ROOT_MARKER), args.boot_timeout, ROOT_MARKER)
        extra["boot_s"] = t - t0
        con.expect(r"# ", 60, "shell prompt")
        con.send("stty -echo")
        con.send('echo BLKBENCH-DISKS $(cat /sys/block/vda/size /sys/block/vdb/size '
                 '/sys/block/vdb/queue/max_sectors_kb)')
        # Output lines may start after the shell's prompt: no ^ anchors; a match must end
        # with the newline, or a line still arriving would be taken in part. The echo of a typed
        # line (before `stty -echo` acts) does not match: it has "$(cat" or "blkbench MODE".
        m, _ = con.expect(r"BLKBENCH-DISKS((?: \d+)*) *\n", 60, "disk sizes")
        sizes = m.group(1).split()
        want = [str(os.path.getsize(args.root) // 512), str(os.path.getsize(args.image) // 512)]
        if sizes[:2] != want:
            raise RunError(f"the guest's vda/vdb have {sizes[:2]} sectors, expected {want} "
                           f"(root image, test image): disks missing or in another order")
        extra["max_sectors_kb"] = sizes[2] if len(sizes) > 2 else "?"
        for test, targs in test_args(args):
            con.send(shlex.join([GUEST_BLKBENCH, test, GUEST_DEV] + targs))
            m, t_begin = con.expect(r"BLKBENCH-(BEGIN|ERROR) [^\n]*\n", 120 + 50 * args.warmup,
                                     f"{test}: start")
            if m.group(1) == "ERROR":
                raise RunError(f"{test}: {m.group(0).strip()}")
            cpu0 = thread_cpu(p.pid)
            limit = max(args.secs, args.rand_secs) * 50 + 120
            m, t_end = con.expect(r"BLKBENCH(?:-ERROR)? [^\n]*\n", limit, f"{test}: result")
            if m.group(0).startswith("BLKBENCH-ERROR"):
                raise RunError(f"{test}: {m.group(0).strip()}")
            cpu1 = thread_cpu(p.pid)
            r = parse_kv(m.group(0))
            results[test] = r
            host_s = t_end - t_begin
            if host_s > 0:
                extra["cpu"][test] = {c: (v - cpu0.get(c, 0.0)) / host_s for c, v in cpu1.items()
                                      if v - cpu0.get(c, 0.0) > 0}
                extra["clock"].append(float(r["secs"]) / host_s)
            progress(f"    {test}: {float(r['MiBps']):.1f} MiB/s, {float(r['iops']):.0f} IOPS "
                     f"({r['bytes']} bytes in {float(r['secs']):.2f} s guest, {host_s:.2f} s host)")
        con.send("exit")
        try:
            status = p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise RunError("the guest did not power off within 60 s of `exit`") from None
        if status != 0:
            raise RunError(f"VMM exit status {status}")
        return results, extra
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except OSError:
                pass
        log.close()
        err.close()


def run_host(kind, args, log_path, progress):
    results = {}
    with open(log_path + ".stdout", "w") as log:
        for test, targs in test_args(args):
            argv = [args.blkbench, test, args.image] + targs + (["-B"] if kind == "cached" else [])
            r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            log.write(r.stdout + r.stderr)
            m = re.search(r"^BLKBENCH (mode=.*)$", r.stdout, re.M)
            if r.returncode != 0 or not m:
                err = re.search(r"^BLKBENCH-ERROR .*$", r.stdout, re.M)
                raise RunError(f"{test}: {err.group(0) if err else r.stderr.strip() or 'no result'}")
            results[test] = parse_kv(m.group(0))
            res = results[test]
            progress(f"    {test}: {float(res['MiBps']):.1f} MiB/s, {float(res['iops']):.0f} IOPS")
    return results, {}


def warm(path):
    """Reads the file once so that it is in the host's page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


def sync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def report(samples, order, baseline, args):
    out = []
    for test, key, heading, unit in METRICS:
        out.append(f"**{heading}** ({unit}, higher is better; min / median / max of "
                   f"{args.rounds} rounds; ratio of medians vs `{baseline}`)")
        out.append("")
        out.append(f"| runner | ok | {unit} | ratio vs {baseline} |")
        out.append("|---|---|---|---|")
        base = [float(s["results"][test][key]) for s in samples[baseline] if s["ok"]] \
            if baseline in samples else []
        for name in order:
            vals = [float(s["results"][test][key]) for s in samples[name] if s["ok"]]
            fmt = "{:.0f}" if unit == "IOPS" else "{:.1f}"
            if name == baseline:
                ratio = "1.00× (baseline)"
            elif vals and base:
                ratio = f"{statistics.median(vals) / statistics.median(base):.2f}×"
            else:
                ratio = "–"
            out.append(f"| {name} | {len(vals)}/{len(samples[name])} | {trip(vals, fmt)} "
                       f"| {ratio} |")
        out.append("")
    notes = []
    for name in order:
        good = [s for s in samples[name] if s["ok"]]
        boots = [s["extra"]["boot_s"] for s in good if "boot_s" in s["extra"]]
        clock = [c for s in good for c in s["extra"].get("clock", [])]
        if boots:
            mskb = sorted({s["extra"].get("max_sectors_kb", "?") for s in good})
            notes.append(f"- `{name}`: boot to `{ROOT_MARKER}` {trip(boots, '{:.1f}')} s; "
                         f"guest-reported / host-observed test time {trip(clock, '{:.3f}')}; "
                         f"guest max_sectors_kb of vdb: {', '.join(mskb)}")
    cpu_lines = []
    for name in order:
        good = [s for s in samples[name] if s["ok"] and s["extra"].get("cpu")]
        if not good:
            continue
        parts = []
        for test, _, _, _ in METRICS:
            per = {}
            for s in good:
                for comm, v in s["extra"]["cpu"].get(test, {}).items():
                    per.setdefault(comm, []).append(v)
            top = sorted(((statistics.median(v), c) for c, v in per.items()), reverse=True)
            top = [f"{c} {v * 100:.0f}%" for v, c in top if v >= 0.02][:4]
            parts.append(f"{test}: {', '.join(top) or '–'}")
        cpu_lines.append(f"- `{name}`: " + "; ".join(parts))
    if notes:
        out.append("VM runs (not part of the scores):")
        out.extend(notes)
        out.append("")
    if cpu_lines:
        out.append("Host CPU time of the VMM's threads while a test ran, by thread name (median "
                   "over the rounds, as a share of one CPU; threads under 2 % left out):")
        out.extend(cpu_lines)
        out.append("")
    out.extend(failed_runs(samples, order))
    return "\n".join(out).rstrip() + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", required=True, help="the raw test image (the guests' vdb)")
    ap.add_argument("--blkbench", required=True, help="blkbench binary for the host runners")
    ap.add_argument("--root-template", help="root image with /usr/bin/blkbench (VM runners)")
    ap.add_argument("--root", help="where each boot's copy of the root image goes (the path "
                                   "the VM commands use)")
    ap.add_argument("--vm", action="append", default=[], metavar="NAME::COMMAND")
    ap.add_argument("--host", action="append", default=[], metavar="NAME::direct|cached")
    ap.add_argument("--rounds", "-n", type=int, default=3)
    ap.add_argument("--baseline", default="qemu-tcg")
    ap.add_argument("--secs", type=float, default=3.0, help="length of a sequential test")
    ap.add_argument("--rand-secs", type=float, default=3.0, help="length of the random test")
    ap.add_argument("--warmup", type=float, default=0.5,
                    help="seconds each test runs unmeasured first (blkbench -w)")
    ap.add_argument("--seq-bytes", type=int, help="data limit of a sequential test (default: "
                                                  "64 times the image size, i.e. --secs decides)")
    ap.add_argument("--boot-timeout", type=float, default=180.0)
    ap.add_argument("--log-dir", required=True)
    ap.add_argument("--json", help="write all samples here")
    ap.add_argument("--quiet", "-q", action="store_true")
    a = ap.parse_args()
    a.seq_bytes = a.seq_bytes or 64 * os.path.getsize(a.image)

    runners = []
    for spec in a.vm:
        name, sep, cmd = spec.partition("::")
        if not sep or not name or not cmd:
            ap.error(f"--vm wants NAME::COMMAND, got {spec!r}")
        runners.append((name, "vm", shlex.split(cmd)))
    for spec in a.host:
        name, sep, kind = spec.partition("::")
        if kind not in ("direct", "cached"):
            ap.error(f"--host wants NAME::direct or NAME::cached, got {spec!r}")
        runners.append((name, kind, None))
    names = [r[0] for r in runners]
    if not runners or len(set(names)) != len(names):
        ap.error("at least one runner, unique names")
    if any(k == "vm" for _, k, _ in runners) and not (a.root_template and a.root):
        ap.error("VM runners need --root-template and --root")
    os.makedirs(a.log_dir, exist_ok=True)

    def progress(msg):
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    samples = {n: [] for n in names}
    for rnd in range(a.rounds):
        k = rnd % len(runners)
        for name, kind, argv in runners[k:] + runners[:k]:
            progress(f"blk: round {rnd + 1}/{a.rounds}: {name}")
            log = os.path.join(a.log_dir, f"{name}.round{rnd + 1}")
            if kind != "direct":
                warm(a.image)
            t = time.monotonic()
            try:
                if kind == "vm":
                    res, extra = run_vm(argv, a, log, progress)
                else:
                    res, extra = run_host(kind, a, log, progress)
                samples[name].append({"ok": True, "results": res, "extra": extra})
                progress(f"    ({time.monotonic() - t:.1f} s)")
            except (RunError, subprocess.TimeoutExpired, OSError) as e:
                samples[name].append({"ok": False, "reason": str(e), "extra": {}})
                progress(f"    FAILED: {e} (output in {log}.*)")
            sync(a.image)

    base = a.baseline if a.baseline in names else names[-1]
    print(report(samples, names, base, a), end="")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rounds": a.rounds, "baseline": base, "tests": test_args(a),
                       "runners": {n: (shlex.join(v) if v else k) for n, k, v in runners},
                       "samples": samples}, f, indent=1)
    ok = all(s["ok"] for ss in samples.values() for s in ss)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
