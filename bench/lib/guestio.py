"""What the benchmark harnesses (blk.py, net.py) share: driving a guest through its serial
console, the VMM's per-thread CPU time, and min / median / max formatting."""

import os
import re
import select
import statistics
import time

# What the test root file system's init prints (scripts/fetch-guest-fixtures.sh).
ROOT_MARKER = "FERROVISOR-ROOT-READY"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class RunError(Exception):
    """A run that went wrong, with a message for the report."""


class Console:
    """A child's stdout (the guest's serial console) read with a deadline, logged and matched
    against regular expressions; its stdin written line by line."""

    def __init__(self, proc, log):
        self.p, self.log = proc, log
        self.fd = proc.stdout.fileno()
        self.buf = ""
        self.eof = False

    def expect(self, pattern, timeout, what):
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m, time.monotonic()
            left = deadline - time.monotonic()
            if self.eof:
                raise RunError(f"{what}: the process exited (status {self.p.wait()})")
            if left <= 0:
                raise RunError(f"{what}: not seen in {timeout:.0f} s")
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
                continue
            self.log.write(chunk)
            self.log.flush()
            self.buf += chunk.decode("latin-1").replace("\r", "")

    def send(self, line):
        try:
            self.p.stdin.write((line + "\n").encode())
            self.p.stdin.flush()
        except BrokenPipeError:
            raise RunError(f"cannot type {line!r}: the VM closed its console") from None


def thread_cpu(pid):
    """CPU seconds (user + system) of each thread of `pid`, summed by thread name."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[comm] = out.get(comm, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def thread_report(pid, path, samples=3, interval=1.0):
    """Writes to `path` what each thread of `pid` is doing, sampled `samples` times
    `interval` s apart: name, scheduler state, CPU ticks so far and the kernel function it
    sleeps in (wchan), then each thread's kernel stack. Called when a run stalls, before the
    VMM is killed: a busy vCPU thread means a guest that runs but does not answer; a console
    thread asleep in the kernel's pipe read has handed all typed input to the guest, one in
    a nanosleep is still waiting for the guest to take it."""
    lines = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        lines.append(f"# sample {i + 1} at {time.monotonic():.3f}")
        try:
            tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
        except FileNotFoundError:
            lines.append("(process gone)")
            break
        for tid in tids:
            t = f"/proc/{pid}/task/{tid}"
            try:
                comm = open(f"{t}/comm").read().strip()
                fields = open(f"{t}/stat").read().rsplit(")", 1)[1].split()
                wchan = open(f"{t}/wchan").read().strip() or "-"
            except OSError:
                continue
            lines.append(f"{tid} {comm:16} state={fields[0]} ticks={int(fields[11]) + int(fields[12])}"
                         f" wchan={wchan}")
    for tid in sorted(os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else [],
                      key=int):
        try:
            stack = open(f"/proc/{pid}/task/{tid}/stack").read()
        except OSError:
            continue
        lines.append(f"# kernel stack of {tid}\n{stack.rstrip()}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def trip(xs, fmt):
    """`min / median / max` of `xs`, each formatted with `fmt`; a dash for no samples."""
    if not xs:
        return "–"
    return " / ".join(fmt.format(v) for v in (min(xs), statistics.median(xs), max(xs)))


def failed_runs(samples, order):
    """Report lines for the runs that failed (`samples[name]` entries with ok False)."""
    fails = [(n, i, s["reason"]) for n in order for i, s in enumerate(samples[n]) if not s["ok"]]
    if not fails:
        return []
    return (["Failed runs (left out of the statistics):"]
            + [f"- {n} round {i + 1}: {why}" for n, i, why in fails] + [""])
