#!/usr/bin/env python3
"""Boot-time harness: run VMM command lines repeatedly and time them (standard library only).

For every run of every runner it measures
  - marker: wall time from just before fork/exec to the first appearance of MARKER in the
    process's stdout (the guest's serial console),
  - exit:   wall time from the same start to the process's exit (wait4),
  - rss:    the process's peak resident set size (wait4 rusage ru_maxrss),
and prints a Markdown table with min / median / max and the ratio of medians against a
baseline runner. Runners are interleaved (run 1 of each, then run 2 of each, ...) so that
drift in the machine's load affects all of them alike.

  measure.py --marker 'ftg: hello' --runs 20 --baseline qemu \\
      --runner 'qemu::qemu-system-x86_64 -M microvm ...' \\
      --runner 'ferrovisor::target/release/ferrovisor run ...'

A runner is NAME::COMMAND; COMMAND is split like a shell would (shlex), no shell runs it.
A run counts only if the marker appeared and the exit status is the expected one
(--expect-exit, default 0; "any" accepts all); failed runs are listed and left out of the
statistics. --json FILE writes every sample. Guest output of the first run and of every failed
run of each runner is kept in --log-dir if given.
"""

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time


# Peak RSS and fork: Linux carries the pre-exec memory's high-water mark into the new program
# (exec_mmap -> setmax_mm_hiwater_rss), so a VMM forked straight from this Python process would
# report at least Python's own RSS (~14 MiB) as its ru_maxrss. GNU time is forked from here but
# forks the VMM itself from its own ~1 MiB image, so its %M is the VMM's real peak (floor ~1 MiB).
TIME = "/usr/bin/time"


def run_once(argv, marker, timeout, log_path=None, via_time=True):
    """Run argv once. Returns a dict with marker_s, exit_s, rss_kb, status, timed_out."""
    rss_file = None
    if via_time:
        fd, rss_file = tempfile.mkstemp(prefix="measure-rss.")
        os.close(fd)
        argv = [TIME, "-f", "%M", "-o", rss_file, "--"] + list(argv)
    try:
        r = _run_once(argv, marker, timeout, log_path)
        if rss_file and "reason" not in r:
            # With a non-zero status GNU time writes "Command exited with ..." first.
            lines = open(rss_file).read().split()
            r["rss_kb"] = int(lines[-1]) if lines and lines[-1].isdigit() else None
        return r
    finally:
        if rss_file:
            os.unlink(rss_file)


def _run_once(argv, marker, timeout, log_path):
    needle = marker.encode()
    keep = max(len(needle) - 1, 0)
    stderr = open(log_path + ".stderr", "wb") if log_path else subprocess.DEVNULL
    out_log = open(log_path + ".stdout", "wb") if log_path else None
    timed_out = threading.Event()
    t_marker = None
    tail = b""
    try:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=stderr, start_new_session=True, bufsize=0)
    except OSError as e:
        return {"ok": False, "reason": f"cannot start: {e}"}

    def kill():
        timed_out.set()
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    fd = p.stdout.fileno()
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if out_log:
                out_log.write(chunk)
            if t_marker is None:
                buf = tail + chunk
                if needle in buf:
                    t_marker = time.perf_counter() - t0
                tail = buf[-keep:] if keep else b""
        _, status, ru = os.wait4(p.pid, 0)  # ru_maxrss: see the note above TIME
        t_exit = time.perf_counter() - t0
    finally:
        timer.cancel()
        p.stdout.close()
        if out_log:
            out_log.close()
        if stderr is not subprocess.DEVNULL:
            stderr.close()
    code = os.waitstatus_to_exitcode(status)
    p.returncode = code  # reaped by wait4 above; keep Popen from trying again
    # Stray processes left in the group (a wrapper's children) must not outlive the run.
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return {"marker_s": t_marker, "exit_s": t_exit, "rss_kb": ru.ru_maxrss, "status": code,
            "timed_out": timed_out.is_set()}


def judge(r, expect_exit):
    if "reason" in r:
        return r
    if r["timed_out"]:
        r["ok"], r["reason"] = False, f"timed out (killed after {r['exit_s']:.1f} s)"
    elif r["marker_s"] is None:
        r["ok"], r["reason"] = False, f"marker not seen (exit status {r['status']})"
    elif expect_exit != "any" and r["status"] != int(expect_exit):
        r["ok"], r["reason"] = False, f"exit status {r['status']}, expected {expect_exit}"
    else:
        r["ok"], r["reason"] = True, ""
    return r


def stats(xs):
    return (min(xs), statistics.median(xs), max(xs)) if xs else None


def fmt_triplet(t, scale, digits):
    if t is None:
        return "–"
    return " / ".join(f"{v * scale:.{digits}f}" for v in t)


def ratio(a, b):
    if a is None or b is None or b[1] == 0:
        return "–"
    return f"{a[1] / b[1]:.2f}×"


def report(results, baseline, runs, marker):
    lines = []
    lines.append(f"Marker `{marker}`, {runs} runs per runner; min / median / max. "
                 f"Ratios are medians relative to `{baseline}`.")
    lines.append("")
    lines.append("| runner | ok | to marker (ms) | to exit (ms) | peak RSS (MiB) "
                 "| marker ratio | exit ratio | RSS ratio |")
    lines.append("|---|---|---|---|---|---|---|---|")
    summ = {}
    for name, samples in results.items():
        good = [s for s in samples if s["ok"]]
        summ[name] = {
            "marker": stats([s["marker_s"] for s in good]),
            "exit": stats([s["exit_s"] for s in good]),
            "rss": stats([s["rss_kb"] for s in good if s["rss_kb"] is not None]),
            "ok": len(good), "n": len(samples),
        }
    base = summ.get(baseline)
    for name, s in summ.items():
        is_base = name == baseline
        lines.append(
            f"| {name} | {s['ok']}/{s['n']} "
            f"| {fmt_triplet(s['marker'], 1000, 1)} | {fmt_triplet(s['exit'], 1000, 1)} "
            f"| {fmt_triplet(s['rss'], 1 / 1024, 1)} "
            + ("| 1.00× (baseline) | 1.00× | 1.00× |" if is_base else
               f"| {ratio(s['marker'], base and base['marker'])} "
               f"| {ratio(s['exit'], base and base['exit'])} "
               f"| {ratio(s['rss'], base and base['rss'])} |"))
    failures = [(n, i, s["reason"]) for n, ss in results.items()
                for i, s in enumerate(ss) if not s["ok"]]
    if failures:
        lines.append("")
        lines.append("Failed runs (left out of the statistics):")
        for n, i, why in failures:
            lines.append(f"- {n} run {i + 1}: {why}")
    return "\n".join(lines), summ


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--marker", required=True, help="string to wait for on stdout")
    ap.add_argument("--runs", "-n", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=1,
                    help="unrecorded runs per runner first (page cache, CPU frequency)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per run")
    ap.add_argument("--expect-exit", default="0", help='exit status of a good run, or "any"')
    ap.add_argument("--runner", action="append", default=[], metavar="NAME::COMMAND",
                    required=True)
    ap.add_argument("--baseline", help="runner to compare against (default: the last)")
    ap.add_argument("--json", help="write all samples and the summary here")
    ap.add_argument("--log-dir", help="keep guest output of first and failed runs here")
    ap.add_argument("--quiet", "-q", action="store_true", help="no per-run progress")
    ap.add_argument("--rss", choices=["time", "wait4"], default="time",
                    help="peak RSS from GNU time (default; exact) or from wait4 on the "
                         "direct child (includes this Python process's ~14 MiB at fork)")
    a = ap.parse_args()

    runners = []
    for spec in a.runner:
        if "::" not in spec:
            ap.error(f"--runner wants NAME::COMMAND, got {spec!r}")
        name, cmd = spec.split("::", 1)
        argv = shlex.split(cmd)
        if not name or not argv:
            ap.error(f"empty name or command in --runner {spec!r}")
        runners.append((name, argv))
    names = [n for n, _ in runners]
    if len(set(names)) != len(names):
        ap.error("runner names must be unique")
    baseline = a.baseline or names[-1]
    if baseline not in names:
        ap.error(f"baseline {baseline!r} is not a runner ({', '.join(names)})")
    if a.log_dir:
        os.makedirs(a.log_dir, exist_ok=True)
    via_time = a.rss == "time"
    if via_time and not os.access(TIME, os.X_OK):
        ap.error(f"{TIME} not found (apt-get install time), or use --rss wait4")

    def progress(msg):
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    for name, argv in runners:
        progress(f"measure: {name}: {shlex.join(argv)}")
        for _ in range(a.warmup):
            r = judge(run_once(argv, a.marker, a.timeout, via_time=via_time), a.expect_exit)
            if not r["ok"]:
                progress(f"measure: {name}: warm-up run failed: {r['reason']}")

    results = {n: [] for n in names}
    for i in range(a.runs):
        for name, argv in runners:
            log = None
            if a.log_dir:
                log = os.path.join(a.log_dir, f"{name}.run{i + 1}")
            r = judge(run_once(argv, a.marker, a.timeout, log, via_time), a.expect_exit)
            results[name].append(r)
            if log and r["ok"] and i > 0:
                for ext in (".stdout", ".stderr"):
                    try:
                        os.unlink(log + ext)
                    except FileNotFoundError:
                        pass
            if r["ok"]:
                progress(f"measure: {name} {i + 1}/{a.runs}: marker {r['marker_s'] * 1000:.1f} ms,"
                         f" exit {r['exit_s'] * 1000:.1f} ms, rss {(r['rss_kb'] or 0) / 1024:.1f} MiB")
            else:
                progress(f"measure: {name} {i + 1}/{a.runs}: FAILED: {r['reason']}")

    table, summ = report(results, baseline, a.runs, a.marker)
    table += ("\n\nPeak RSS: GNU time's maximum resident set size of the VMM process."
              if via_time else "\n\nPeak RSS: wait4 ru_maxrss (includes the harness's RSS at fork).")
    print(table)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"marker": a.marker, "runs": a.runs, "baseline": baseline,
                       "runners": {n: shlex.join(v) for n, v in runners},
                       "samples": results, "summary": summ}, f, indent=1)
    total_ok = sum(s["ok"] for s in summ.values())
    sys.exit(0 if total_ok == sum(s["n"] for s in summ.values()) else 1)


if __name__ == "__main__":
    main()
