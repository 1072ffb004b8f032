#!/usr/bin/env python3
"""Snapshot, restore and clone benchmark harness for bench/snapshot.sh (standard library only).

For each back end and guest memory size it boots one guest that prints `count N` lines on its
serial console (stdout) without pause, then:
  - snapshot: --runs times, `PUT /vm/pause`, `PUT /vm/snapshot` into a fresh directory,
    `PUT /vm/resume` over the VM's API socket, each timed from sending the request to the end
    of the reply; the memory file's apparent size and the space it takes (st_blocks);
  - restore: --runs times, alternating; round i restores snapshot i:
      cold    `ferrovisor run --restore DIR`: process start (just before fork/exec) to the
              first byte the restored guest prints;
      paused  `ferrovisor run --restore DIR --paused --api-sock S`: process start until
              `GET /vm/info` says paused, then `PUT /vm/resume` sent → first byte;
    each run must go on to print a whole count line whose number follows the last one printed
    before the snapshot (the guest continued where it was), else it counts as failed;
  - a peer, where given: QEMU with the same guest and memory, `stop` and
    `migrate exec:cat > FILE` over QMP (timed to the MIGRATION completed event), then
    `-incoming "exec:cat FILE"`, `cont` as soon as `query-status` leaves `inmigrate`.
Clones: one snapshot of a guest counting every --clone-count-ms ms; for each K in --clones,
K `ferrovisor run --restore DIR` processes started at once, the time until every one has printed
a whole count line, and the RSS / PSS of all of them when they all run and --settle s later.

  snapshot.py --ferrovisor target/release/ferrovisor --log-dir LOGS --work DIR \\
      --vm 'emu::--backend emu --kernel vmlinuz --initrd initramfs.cpio.gz::console=ttyS0 ...' \\
      --peer 'emu::qemu-system-x86_64 -accel tcg -M pc ...' --sizes 256M,1G,4G --runs 5

Every request and every wait has a timeout; a run that fails is listed with its reason and left
out of the statistics. Times are time.perf_counter(); the harness is one thread polling all
file descriptors, so a timestamp is taken when the byte or the reply arrives.
"""

import argparse
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

from guestio import CLK_TCK, RunError, failed_runs, trip

# A whole count line: the initramfs prints "count N", the test guest "ftg: count N".
COUNT_RX = re.compile(rb"(?:^|(?<=\n))(?:ftg: )?count (\d+)\r?\n")
MIB = 1 << 20
MAPPING_RX = re.compile(r"[0-9a-f]+-[0-9a-f]+ ")  # a mapping's first line in /proc/PID/smaps


def now():
    return time.perf_counter()


def fail_runs(rows, runs, reason):
    """Records `runs` failed runs with `reason` in each of `rows`."""
    for r in rows:
        r.extend({"ok": False, "reason": reason} for _ in range(runs))


# ---------------------------------------------------------------- a child's console

class Out:
    """A child's stdout (the guest's serial console), read without blocking: when the first
    byte came, the whole count lines (first and last number), a log of the first bytes."""

    def __init__(self, proc, log_path, keep=1 << 16):
        self.p = proc
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.log = open(log_path, "wb")
        self.keep = keep
        self.logged = 0
        self.rest = b""
        self.t_first = None
        self.first_count = self.last_count = None
        self.t_first_count = None
        self.nbytes = 0
        self.eof = False
        self.t_mark = None   # first byte read after mark()

    def mark(self):
        self.pump()
        self.t_mark = None

    def pump(self):
        """Reads what is there. True if something was read."""
        got = False
        while not self.eof:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            t = now()
            if not chunk:
                self.eof = True
                break
            got = True
            if self.t_first is None:
                self.t_first = t
            if self.t_mark is None:
                self.t_mark = t
            self.nbytes += len(chunk)
            if self.logged < self.keep:
                part = chunk[:self.keep - self.logged]
                self.log.write(part)
                self.log.flush()
                self.logged += len(part)
            buf = self.rest + chunk
            end = None
            for m in COUNT_RX.finditer(buf):
                n = int(m.group(1))
                if self.first_count is None:
                    self.first_count, self.t_first_count = n, t
                self.last_count = n
                end = m.end()
            self.rest = buf[end:] if end is not None else buf
            if len(self.rest) > 128:
                # NUL: what is left is not the start of a line for ^ any more.
                self.rest = b"\0" + self.rest[-128:]
        return got

    def close(self):
        self.log.close()


def wait_for(outs, cond, timeout, what, extra_fds=(), on_fd=None):
    """Polls the consoles in `outs` (and `extra_fds`, handed to on_fd) until cond() is true."""
    deadline = now() + timeout
    pl = select.poll()
    live = {o.fd: o for o in outs if not o.eof}
    for fd in live:
        pl.register(fd, select.POLLIN)
    for fd in extra_fds:
        pl.register(fd, select.POLLIN)
    while True:
        for o in outs:
            o.pump()
        for fd in [fd for fd, o in live.items() if o.eof]:
            pl.unregister(fd)   # a closed pipe would wake poll at once, for ever
            del live[fd]
        if cond():
            return
        left = deadline - now()
        if left <= 0:
            raise RunError(f"{what}: not seen within {timeout:.0f} s")
        if outs and not live and not extra_fds:
            raise RunError(f"{what}: the process exited (status {outs[0].p.poll()})")
        for fd, _ in pl.poll(min(left, 1.0) * 1000):
            if fd in extra_fds and on_fd and on_fd(fd):
                pl.unregister(fd)


def spawn(argv, log_prefix):
    err = open(log_prefix + ".stderr", "wb")
    t0 = now()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                         start_new_session=True, bufsize=0)
    err.close()
    return p, t0, Out(p, log_prefix + ".stdout")


def stop(p, out=None, grace=5.0):
    """Ends a child we started (SIGKILL: nothing of it is measured any more) and reaps it."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    if out:
        out.close()
    p.stdout.close()


# ---------------------------------------------------------------- the Ferrovisor API

class Http:
    """One request on the VMM's API socket (HTTP/1.1, Connection: close), started at once and
    finished by feed() while the caller polls other descriptors as well."""

    def __init__(self, path, method, endpoint, body=None):
        data = json.dumps(body).encode() if body is not None else b""
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.t0 = now()
        self.s.connect(path)
        self.s.sendall(f"{method} /api/v1{endpoint} HTTP/1.1\r\nHost: localhost\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                       "\r\n".encode() + data)
        self.s.setblocking(False)
        self.buf = b""
        self.t_reply = None
        self.what = f"{method} {endpoint}"

    def fileno(self):
        return self.s.fileno()

    def feed(self):
        """Reads; True when the reply is complete (the server closes the connection)."""
        while True:
            try:
                chunk = self.s.recv(65536)
            except BlockingIOError:
                return False
            if not chunk:
                self.t_reply = now()
                self.s.close()
                return True
            self.buf += chunk

    def result(self):
        head, _, body = self.buf.partition(b"\r\n\r\n")
        try:
            status = int(head.split()[1])
        except (IndexError, ValueError):
            raise RunError(f"{self.what}: no HTTP reply ({self.buf[:80]!r})") from None
        return status, body


def api(path, method, endpoint, body=None, timeout=120.0, want=(200, 204)):
    """A request, waited for. Returns (seconds from send to reply, JSON body or None)."""
    h = Http(path, method, endpoint, body)
    deadline = h.t0 + timeout
    while not h.feed():
        left = deadline - now()
        if left <= 0:
            h.s.close()
            raise RunError(f"{h.what}: no reply within {timeout:.0f} s")
        select.select([h.s], [], [], left)
    status, data = h.result()
    if status not in want:
        raise RunError(f"{h.what}: HTTP {status} {data.decode(errors='replace').strip()}")
    return h.t_reply - h.t0, (json.loads(data) if data.strip() else None)


def wait_socket(path, deadline, p):
    """Until something accepts connections on `path` (the VMM is up)."""
    while True:
        if p.poll() is not None:
            raise RunError(f"the VMM exited (status {p.returncode}) before serving {path}")
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.close()
            return
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
        if now() > deadline:
            raise RunError(f"nothing listens on {path}")
        time.sleep(0.0005)


# ---------------------------------------------------------------- QMP

class Qmp:
    """A QMP connection; events that arrive meanwhile are kept in `events`."""

    def __init__(self, path, deadline, p):
        wait_socket(path, deadline, p)
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.buf = b""
        self.events = []
        self.next(now() + 10)  # greeting
        self.cmd("qmp_capabilities")

    def fileno(self):
        return self.s.fileno()

    def send(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")

    def _fill(self, timeout):
        r, _, _ = select.select([self.s], [], [], max(timeout, 0))
        if not r:
            return False
        chunk = self.s.recv(65536)
        if not chunk:
            raise RunError("QMP: QEMU closed the monitor")
        self.buf += chunk
        return True

    def _take(self):
        line, sep, rest = self.buf.partition(b"\n")
        if not sep:
            return None
        self.buf = rest
        m = json.loads(line)
        if "event" in m:
            self.events.append(m)
        return m

    def next(self, deadline):
        """The next message (events are kept as well)."""
        while True:
            m = self._take()
            if m is not None:
                return m
            if not self._fill(deadline - now()) and now() > deadline:
                raise RunError("QMP: no answer")

    def ready(self):
        """Non-blocking: the messages that have arrived."""
        while self._fill(0):
            pass
        msgs = []
        while (m := self._take()) is not None:
            msgs.append(m)
        return msgs

    def reply(self, what, timeout=120.0):
        deadline = now() + timeout
        while True:
            m = self.next(deadline)
            if "return" in m:
                return m["return"]
            if "error" in m:
                raise RunError(f"QMP {what}: {m['error'].get('desc')}")

    def cmd(self, name, **args):
        t0 = now()
        self.send(name, **args)
        r = self.reply(name)
        return r, now() - t0

    def wait_event(self, pred, timeout, what):
        deadline = now() + timeout
        while True:
            for i, e in enumerate(self.events):
                if pred(e):
                    del self.events[i]
                    return e, now()
            if now() > deadline:
                raise RunError(f"QMP: {what} not seen within {timeout:.0f} s")
            self.next(deadline)

    def close(self):
        self.s.close()


def qmp_cont(q, out, timeout):
    """Sends `cont`; returns (seconds to its reply, seconds to the guest's next byte)."""
    out.mark()
    done = {}

    def on_qmp(fd):
        for m in q.ready():
            if "return" in m or "error" in m:
                done["t"], done["m"] = now(), m
                return True
        return False

    tc = now()
    q.send("cont")
    wait_for([out], lambda: out.t_mark is not None and done, timeout,
             "output after cont", [q.fileno()], on_qmp)
    if "error" in done["m"]:
        raise RunError(f"cont: {done['m']['error']}")
    return done["t"] - tc, out.t_mark - tc


# ---------------------------------------------------------------- measurements

def mem_file(d):
    """(apparent bytes, allocated bytes) of the memory file(s) in snapshot directory d."""
    app = alloc = 0
    for name in os.listdir(d):
        if name.startswith("memory-"):
            st = os.stat(os.path.join(d, name))
            app += st.st_size
            alloc += st.st_blocks * 512
    return app, alloc


def proc_mem(pid):
    """RSS (and its anon / file parts) and PSS of a process, in KiB."""
    r = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    r[k] = int(v.split()[0])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Pss", "Pss_Anon", "Pss_File"):
                    r[k] = int(v.split()[0])
        # Guest RAM: the private mappings of the snapshot's memory file. Their Anonymous
        # pages are the ones the guest (or the VMM for it) wrote since the restore.
        r["GuestRss"] = r["GuestAnon"] = 0
        with open(f"/proc/{pid}/smaps") as f:
            guest = False
            for line in f:
                if MAPPING_RX.match(line):
                    guest = "/memory-" in line
                    continue
                k, _, v = line.partition(":")
                if guest and k == "Rss":
                    r["GuestRss"] += int(v.split()[0])
                elif guest and k == "Anonymous":
                    r["GuestAnon"] += int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return r


def cpu_seconds(pid):
    """User + system CPU time of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def mem_available_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def continuity(out, before, what):
    """The restored guest's first whole count line must follow the last one before the
    snapshot: +1, or +2 when the snapshot caught a line half printed."""
    if before is None or out.first_count is None:
        return
    d = out.first_count - before
    if d not in (1, 2):
        raise RunError(f"{what}: first count line after restore is {out.first_count}, "
                       f"the last before the snapshot was {before}")


def size_bytes(s):
    s = s.strip().upper()
    mul = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], None)
    return int(s[:-1]) * mul if mul else int(s) * MIB


class Bench:
    def __init__(self, a):
        self.a = a
        self.samples = {}   # row name -> list of {"ok":..., ...}
        self.order = []
        self.rows = {}      # row name -> (table, dict of labels)

    def progress(self, msg):
        if not self.a.quiet:
            print(f"snapshot: {msg}", file=sys.stderr, flush=True)

    def row(self, table, name, **labels):
        if name not in self.samples:
            self.samples[name] = []
            self.order.append(name)
            self.rows[name] = (table, labels)
        return self.samples[name]

    def log(self, *parts):
        return os.path.join(self.a.log_dir, "-".join(str(p) for p in parts))

    def attempt(self, rows, what, fn):
        """Runs fn() -> sample dict; a RunError is a failed sample in every row of `rows`."""
        try:
            s = fn()
            s["ok"] = True
        except (RunError, OSError, subprocess.SubprocessError, ValueError) as e:
            s = {"ok": False, "reason": f"{what}: {e}"}
            self.progress(f"    FAILED: {what}: {e}")
        for r in rows:
            r.append(s)
        return s

    # ------------------------------------------------------------ Ferrovisor

    def fv_boot(self, tag, vmargs, cmdline, mem, sock):
        argv = ([self.a.ferrovisor, "run"] + vmargs
                + ["--cmdline", cmdline, "--memory", mem, "--api-sock", sock])
        p, t0, out = spawn(argv, self.log(tag, "boot"))
        try:
            wait_for([out], lambda: out.last_count is not None and out.last_count >= 3,
                     self.a.boot_timeout, "count lines after boot")
            settle = now() + 0.3
            while now() < settle:
                out.pump()
                time.sleep(0.01)
        except RunError:
            stop(p, out)
            raise
        self.progress(f"  booted in {out.t_first_count - t0:.1f} s")
        return p, out

    def drain(self, out, secs):
        end = now() + secs
        while True:
            out.pump()
            left = end - now()
            if left <= 0:
                return
            select.select([out.fd], [], [], left)

    def fv_snapshots(self, backend, mem, vmargs, cmdline, work):
        a = self.a
        label = f"ferrovisor {backend}"
        row = self.row("snap", f"{label} {mem} snapshot", runner=label, mem=mem)
        sock = os.path.join(work, "src.sock")
        try:
            p, out = self.fv_boot(f"fv-{backend}-{mem}", vmargs, cmdline, mem, sock)
        except RunError as e:
            for _ in range(a.runs):
                row.append({"ok": False, "reason": f"boot: {e}"})
            self.progress(f"    FAILED: boot: {e}")
            return []
        snaps = []
        try:
            for i in range(a.runs):
                d = os.path.join(work, f"snap{i}")

                def one():
                    out.pump()
                    t_pause, _ = api(sock, "PUT", "/vm/pause")
                    self.drain(out, 0.05)   # what the guest printed before it stopped
                    before = out.last_count
                    t_snap, _ = api(sock, "PUT", "/vm/snapshot", {"dir": d}, timeout=600)
                    app, alloc = mem_file(d)
                    # Resume, timed to the reply and to the guest's next byte: the same
                    # VM, warm, for comparison with a restored one.
                    out.mark()
                    h = Http(sock, "PUT", "/vm/resume")
                    wait_for([out], lambda: out.t_mark is not None and h.t_reply, a.timeout,
                             "output after resume", [h.fileno()], lambda fd: h.feed())
                    st, body = h.result()
                    if st != 204:
                        raise RunError(f"resume: HTTP {st} {body!r}")
                    n0 = out.last_count
                    self.drain(out, a.gap)
                    if out.last_count == n0:
                        raise RunError("the guest printed nothing after resume")
                    return {"pause_s": t_pause, "snapshot_s": t_snap,
                            "resume_s": h.t_reply - h.t0, "resume_byte_s": out.t_mark - h.t0,
                            "line_interval_s": a.gap / (out.last_count - n0),
                            "apparent": app, "allocated": alloc, "count_before": before,
                            "dir": d}

                s = self.attempt([row], f"{label} {mem} snapshot {i + 1}", one)
                if s["ok"]:
                    self.progress(f"  snapshot {i + 1}: pause {s['pause_s'] * 1e3:.1f} ms, "
                                  f"snapshot {s['snapshot_s'] * 1e3:.1f} ms, "
                                  f"{s['allocated'] / MIB:.1f} MiB on disk")
                    snaps.append((d, s["count_before"]))
                else:
                    shutil.rmtree(d, ignore_errors=True)
        finally:
            try:
                api(sock, "PUT", "/vm/kill", timeout=10)
            except (RunError, OSError):
                pass
            stop(p, out)
        return snaps

    def fv_restores(self, backend, mem, snaps, work):
        """Round i restores snapshot i: each was taken at another point of the guest's loop,
        so the wait for its next byte varies as it would for any snapshot."""
        a = self.a
        label = f"ferrovisor {backend}"
        cold = self.row("restore", f"{label} {mem} restore", runner=label, mem=mem,
                        kind="cold")
        paused = self.row("restore-paused", f"{label} {mem} restore --paused + resume",
                          runner=label, mem=mem, kind="paused")
        if not snaps:
            fail_runs((cold, paused), a.runs, "no snapshot to restore")
            return
        for i in range(a.runs):
            snap, before = snaps[i % len(snaps)]

            def one_cold():
                argv = [a.ferrovisor, "run", "--restore", snap]
                p, t0, out = spawn(argv, self.log(f"fv-{backend}-{mem}", "restore", i + 1))
                try:
                    wait_for([out], lambda: out.first_count is not None, a.timeout,
                             "a whole count line")
                    m = proc_mem(p.pid)
                    continuity(out, before, "restore")
                    return {"first_byte_s": out.t_first - t0,
                            "first_line_s": out.t_first_count - t0,
                            "rss_kib": m and m.get("VmRSS")}
                finally:
                    stop(p, out)

            def one_paused():
                sock = os.path.join(work, f"r{i}.sock")
                argv = [a.ferrovisor, "run", "--restore", snap, "--paused", "--api-sock", sock]
                p, t0, out = spawn(argv, self.log(f"fv-{backend}-{mem}", "paused", i + 1))
                try:
                    deadline = t0 + a.timeout
                    wait_socket(sock, deadline, p)
                    while True:
                        _, info = api(sock, "GET", "/vm/info", timeout=a.timeout)
                        if info and info.get("state") == "paused":
                            break
                        if now() > deadline:
                            raise RunError(f"state {info and info.get('state')}, not paused")
                        time.sleep(0.0005)
                    t_ready = now()
                    out.pump()
                    if out.nbytes:
                        raise RunError("the paused VM printed before resume")
                    h = Http(sock, "PUT", "/vm/resume")
                    wait_for([out], lambda: out.first_count is not None and h.t_reply,
                             a.timeout, "a whole count line after resume", [h.fileno()],
                             lambda fd: h.feed())
                    st, body = h.result()
                    if st != 204:
                        raise RunError(f"resume: HTTP {st} {body!r}")
                    continuity(out, before, "restore --paused")
                    return {"ready_s": t_ready - t0, "resume_reply_s": h.t_reply - h.t0,
                            "first_byte_s": out.t_first - h.t0,
                            "first_line_s": out.t_first_count - h.t0}
                finally:
                    stop(p, out)
                    if os.path.exists(sock):
                        os.unlink(sock)

            s = self.attempt([cold], f"{label} {mem} restore {i + 1}", one_cold)
            if s["ok"]:
                self.progress(f"  restore {i + 1}: first byte {s['first_byte_s'] * 1e3:.1f} ms")
            s = self.attempt([paused], f"{label} {mem} restore --paused {i + 1}", one_paused)
            if s["ok"]:
                self.progress(f"  restore --paused {i + 1}: ready {s['ready_s'] * 1e3:.1f} ms,"
                              f" resume → first byte {s['first_byte_s'] * 1e3:.1f} ms")

    # ------------------------------------------------------------ QEMU

    def qemu(self, backend, mem, qargv, cmdline, work):
        a = self.a
        label = a.peer_names[backend]
        snaprow = self.row("snap", f"{label} {mem} snapshot", runner=label, mem=mem)
        cold = self.row("restore", f"{label} {mem} restore", runner=label, mem=mem,
                        kind="cold")
        paused = self.row("restore-paused", f"{label} {mem} restore paused + cont",
                          runner=label, mem=mem, kind="paused")
        mb = size_bytes(mem) // MIB
        base = qargv + ["-m", str(mb), "-append", cmdline]
        qsock = os.path.join(work, "qmp.sock")
        tag = f"qemu-{backend}-{mem}"
        p, t0, out = spawn(base + ["-qmp", f"unix:{qsock},server=on,wait=off"],
                           self.log(tag, "boot"))
        saved = []
        try:
            wait_for([out], lambda: out.last_count is not None and out.last_count >= 3,
                     self.a.boot_timeout, "count lines after boot")
            self.progress(f"  qemu booted in {out.t_first_count - t0:.1f} s")
            q = Qmp(qsock, now() + 10, p)
            q.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "events", "state": True}])
            q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
            for i in range(a.runs):
                f = os.path.join(work, f"qemu{i}.mig")

                def one():
                    out.pump()
                    _, t_pause = q.cmd("stop")
                    self.drain(out, 0.05)
                    before = out.last_count
                    t = now()
                    q.cmd("migrate", uri=f"exec:cat > {shlex.quote(f)}")
                    _, t_done = q.wait_event(
                        lambda e: e["event"] == "MIGRATION"
                        and e["data"]["status"] in ("completed", "failed"), 600, "migration")
                    st, _ = q.cmd("query-migrate")
                    if st.get("status") != "completed":
                        raise RunError(f"migration {st.get('status')}")
                    fd = os.open(f, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
                    t_sync = now()
                    size = os.path.getsize(f)
                    t_cont, t_byte = qmp_cont(q, out, a.timeout)
                    n0 = out.last_count
                    self.drain(out, a.gap)
                    if out.last_count == n0:
                        raise RunError("the guest printed nothing after cont")
                    return {"pause_s": t_pause, "snapshot_s": t_done - t,
                            "snapshot_fsync_s": t_sync - t, "resume_s": t_cont,
                            "resume_byte_s": t_byte,
                            "line_interval_s": a.gap / max(out.last_count - n0, 1),
                            "apparent": size, "allocated": os.stat(f).st_blocks * 512,
                            "count_before": before, "file": f}

                s = self.attempt([snaprow], f"{label} {mem} save {i + 1}", one)
                if s["ok"]:
                    self.progress(f"  qemu save {i + 1}: stop {s['pause_s'] * 1e3:.1f} ms, "
                                  f"migrate {s['snapshot_s'] * 1e3:.1f} ms, "
                                  f"{s['apparent'] / MIB:.1f} MiB")
                    saved.append((f, s["count_before"]))
            q.close()
        except RunError as e:
            for _ in range(a.runs - len(snaprow)):
                snaprow.append({"ok": False, "reason": f"qemu {mem}: {e}"})
            self.progress(f"    FAILED: qemu {mem}: {e}")
        finally:
            stop(p, out)
        if not saved:
            fail_runs((cold, paused), a.runs, "no saved state to restore")
            return
        for i in range(a.runs):
            mig, before = saved[i % len(saved)]

            def one_restore():
                sock = os.path.join(work, f"qr{i}.sock")
                argv = base + ["-qmp", f"unix:{sock},server=on,wait=off",
                               "-incoming", f"exec:cat {shlex.quote(mig)}"]
                p, t0, out = spawn(argv, self.log(tag, "restore", i + 1))
                try:
                    q = Qmp(sock, t0 + a.timeout, p)
                    while True:
                        st, _ = q.cmd("query-status")
                        if st.get("status") != "inmigrate":
                            break
                        if now() > t0 + a.timeout:
                            raise RunError("still inmigrate")
                        time.sleep(0.0005)
                    if st.get("status") not in ("paused", "running"):
                        raise RunError(f"after the incoming migration: {st.get('status')}")
                    t_ready = now()
                    out.pump()
                    if out.nbytes:
                        raise RunError("the guest printed before cont")
                    tc = now()
                    t_reply, _ = qmp_cont(q, out, a.timeout)
                    wait_for([out], lambda: out.first_count is not None, a.timeout,
                             "a whole count line after cont")
                    continuity(out, before, "qemu -incoming")
                    q.close()
                    return {"cold": {"first_byte_s": out.t_first - t0,
                                     "first_line_s": out.t_first_count - t0},
                            "paused": {"ready_s": t_ready - t0,
                                       "resume_reply_s": t_reply,
                                       "first_byte_s": out.t_first - tc,
                                       "first_line_s": out.t_first_count - tc}}
                finally:
                    stop(p, out)

            s = self.attempt([], f"{label} {mem} restore {i + 1}", one_restore)
            if s["ok"]:
                cold.append(dict(s["cold"], ok=True))
                paused.append(dict(s["paused"], ok=True))
                self.progress(f"  qemu restore {i + 1}: first byte "
                              f"{s['cold']['first_byte_s'] * 1e3:.1f} ms (incoming done "
                              f"{s['paused']['ready_s'] * 1e3:.1f} ms)")
            else:
                cold.append(s)
                paused.append(s)
        for f, _ in saved:
            os.unlink(f)

    # ------------------------------------------------------------ clones

    def clones(self, backend, vmargs, cmdline, work):
        a = self.a
        mem = a.clone_memory
        label = f"ferrovisor {backend}"
        sock = os.path.join(work, "csrc.sock")
        d = os.path.join(work, "clone-snap")
        self.progress(f"{label}: clone snapshot, {mem}, a count line every "
                      f"{a.clone_count_ms} ms")
        rows = {k: self.row("clones", f"{label} {k} clones", runner=label, clones=k, mem=mem)
                for k in a.clones}

        def make():
            p, out = self.fv_boot(f"fv-{backend}-clone", vmargs, cmdline, mem, sock)
            try:
                api(sock, "PUT", "/vm/pause")
                api(sock, "PUT", "/vm/snapshot", {"dir": d}, timeout=600)
            finally:
                try:
                    api(sock, "PUT", "/vm/kill", timeout=10)
                except (RunError, OSError):
                    pass
                stop(p, out)
            app, alloc = mem_file(d)
            return {"apparent": app, "allocated": alloc}

        s = self.attempt([], f"{label} clone snapshot", make)
        if not s["ok"]:
            for r in rows.values():
                r.append(s)
            return
        self.clone_file = s
        for k in a.clones:
            self.progress(f"  {k} clones")

            def run_k():
                procs = []
                avail0 = mem_available_kib()
                try:
                    t_start = now()
                    for j in range(k):
                        argv = [a.ferrovisor, "run", "--restore", d]
                        p, t0, out = spawn(argv, self.log(f"fv-{backend}-clone{k}", j + 1))
                        procs.append((p, t0, out))
                        for _, _, o in procs:
                            o.pump()
                    t_spawned = now()
                    outs = [o for _, _, o in procs]
                    wait_for(outs, lambda: all(o.first_count is not None for o in outs),
                             a.timeout + k * 2, f"a count line from each of {k} clones")
                    t_all = max(o.t_first_count for o in outs)
                    m_run = [proc_mem(p.pid) for p, _, _ in procs]
                    avail1 = mem_available_kib()
                    cpu0, tc0 = [cpu_seconds(p.pid) for p, _, _ in procs], now()
                    self.drain_many(outs, a.settle)
                    cpu1, tc1 = [cpu_seconds(p.pid) for p, _, _ in procs], now()
                    m_after = [proc_mem(p.pid) for p, _, _ in procs]
                    avail2 = mem_available_kib()
                    dead = [j + 1 for j, (p, _, _) in enumerate(procs) if p.poll() is not None]
                    if dead or any(m is None for m in m_after):
                        raise RunError(f"clones {dead} exited")
                    lines = [o.last_count - o.first_count for o in outs]
                    cpu = sum(y - x for x, y in zip(cpu0, cpu1) if x is not None and y is not None)
                    return {"all_s": t_all - t_start, "spawn_s": t_spawned - t_start,
                            "cpu_share": cpu / (tc1 - tc0),
                            "per_clone_s": [o.t_first_count - t0 for _, t0, o in procs],
                            "first_byte_s": [o.t_first - t0 for _, t0, o in procs],
                            "mem_running": m_run, "mem_after": m_after,
                            "avail_drop_running_kib": avail0 - avail1,
                            "avail_drop_after_kib": avail0 - avail2,
                            "lines_in_settle": lines}
                finally:
                    for p, _, o in procs:
                        stop(p, o, grace=10)

            s = self.attempt([rows[k]], f"{label} {k} clones", run_k)
            if s["ok"]:
                tot = lambda ms, key: sum(m.get(key, 0) for m in ms) / 1024
                self.progress(f"    all printed after {s['all_s'] * 1e3:.0f} ms; RSS "
                              f"{tot(s['mem_running'], 'VmRSS'):.0f} → "
                              f"{tot(s['mem_after'], 'VmRSS'):.0f} MiB, PSS "
                              f"{tot(s['mem_running'], 'Pss'):.0f} → "
                              f"{tot(s['mem_after'], 'Pss'):.0f} MiB")
        shutil.rmtree(d, ignore_errors=True)

    def drain_many(self, outs, secs):
        end = now() + secs
        while True:
            for o in outs:
                o.pump()
            left = end - now()
            if left <= 0:
                return
            select.select([o.fd for o in outs if not o.eof] or [], [], [], min(left, 0.5))
            if all(o.eof for o in outs):
                time.sleep(min(left, 0.5))


# ---------------------------------------------------------------- report

def ms(v):
    return v * 1e3


def col(samples, key, fmt="{:.1f}", scale=1e3):
    xs = [s[key] * scale for s in samples if s["ok"] and s.get(key) is not None]
    return trip(xs, fmt)


def med(samples, key):
    xs = [s[key] for s in samples if s["ok"] and s.get(key) is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    if a is None or not b:
        return "–"
    return f"{a / b:.2f}×"


def report(b):
    a = b.a
    S = b.samples
    out = []
    names = lambda table: [n for n in b.order if b.rows[n][0] == table]
    peer_of = {}   # (runner of ferrovisor row, mem) -> peer row name
    for n in b.order:
        t, lab = b.rows[n]
        if not lab["runner"].startswith("ferrovisor"):
            for be, pn in a.peer_names.items():
                if lab["runner"] == pn:
                    peer_of[(f"ferrovisor {be}", lab["mem"], t)] = n

    out.append(f"Min / median / max of {a.runs} runs per row; ratios are medians against "
               "QEMU with the same guest, memory and accelerator class, in this run.")
    out.append("")
    out.append("Snapshot of a paused VM (pause and snapshot timed from the API request to its "
               "reply; QEMU: `stop`, then `migrate exec:cat > FILE` to the completed event, "
               "and with the file fsynced):")
    out.append("")
    out.append("| runner | memory | ok | pause (ms) | snapshot (ms) | ratio | first snapshot (ms) "
               "| resume (ms) | memory file on disk (MiB) | file size (MiB) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for n in names("snap"):
        lab = b.rows[n][1]
        ss = S[n]
        ok = [s for s in ss if s["ok"]]
        snap = col(ss, "snapshot_s")
        if "snapshot_fsync_s" in (ok[0] if ok else {}):
            snap += f" ({col(ss, 'snapshot_fsync_s')} with fsync)"
        peer = peer_of.get((lab["runner"], lab["mem"], "snap"))
        if lab["runner"].startswith("ferrovisor"):
            r = ratio(med(ss, "snapshot_s"), peer and med(S[peer], "snapshot_fsync_s"))
        else:
            r = "1.00×"
        first = f"{ms(ss[0]['snapshot_s']):.1f}" if ss and ss[0]["ok"] else "–"
        out.append(f"| {lab['runner']} | {lab['mem']} | {len(ok)}/{len(ss)} "
                   f"| {col(ss, 'pause_s')} | {snap} | {r} | {first} | {col(ss, 'resume_s')} "
                   f"| {col(ss, 'allocated', '{:.1f}', 1 / MIB)} "
                   f"| {col(ss, 'apparent', '{:.0f}', 1 / MIB)} |")
    out.append("")
    out.append("Restore to running. Cold: process start (just before fork/exec) to the restored "
               "guest's first console byte. Paused: restored with `--paused` (QEMU: until "
               "`query-status` leaves `inmigrate`), then `resume` (QEMU: `cont`) sent → first "
               "byte. For comparison, the same for the original VM after each snapshot (warm), "
               "and the guest's time between two count lines (the first byte waits for the "
               "next one; nothing is subtracted):")
    out.append("")
    out.append("| runner | memory | ok | start → first byte (ms) | ratio | RSS then (MiB) "
               "| ok | start → paused (ms) | resume → first byte (ms) | ratio "
               "| original VM: resume → first byte (ms) | line interval (ms) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in names("restore"):
        lab = b.rows[n][1]
        pn = next(x for x in names("restore-paused")
                  if b.rows[x][1]["runner"] == lab["runner"] and b.rows[x][1]["mem"] == lab["mem"])
        sn = next((x for x in names("snap")
                   if b.rows[x][1]["runner"] == lab["runner"] and b.rows[x][1]["mem"] == lab["mem"]),
                  None)
        c, p, sv = S[n], S[pn], (S[sn] if sn else [])
        if lab["runner"].startswith("ferrovisor"):
            pc = peer_of.get((lab["runner"], lab["mem"], "restore"))
            pp = peer_of.get((lab["runner"], lab["mem"], "restore-paused"))
            rc = ratio(med(c, "first_byte_s"), pc and med(S[pc], "first_byte_s"))
            rp = ratio(med(p, "first_byte_s"), pp and med(S[pp], "first_byte_s"))
        else:
            rc = rp = "1.00×"
        out.append(f"| {lab['runner']} | {lab['mem']} | {sum(s['ok'] for s in c)}/{len(c)} "
                   f"| {col(c, 'first_byte_s')} | {rc} "
                   f"| {col(c, 'rss_kib', '{:.1f}', 1 / 1024)} "
                   f"| {sum(s['ok'] for s in p)}/{len(p)} | {col(p, 'ready_s')} "
                   f"| {col(p, 'first_byte_s')} | {rp} | {col(sv, 'resume_byte_s')} "
                   f"| {col(sv, 'line_interval_s')} |")
    cl = names("clones")
    if cl:
        out.append("")
        out.append(f"Clones: K processes `ferrovisor run --restore DIR` of one snapshot "
                   f"({a.clone_memory}, the guest printing a count line every "
                   f"{a.clone_count_ms} ms) started at once; time from the first start until "
                   f"every clone has printed a whole count line; memory of all K when they "
                   f"all run and {a.settle:g} s later (sums; PSS from smaps_rollup counts "
                   f"the shared snapshot pages once; guest RAM written: the anonymous, copied-on-"
                   f"write pages of the memory file's mappings); per clone: from its own start; CPU: "
                   f"of all K together in those {a.settle:g} s, 100 % = one host CPU:")
        out.append("")
        out.append("| runner | clones | ok | all started (ms) | all printed (ms) | per clone (ms) "
                   "| RSS (MiB) | of it anon (MiB) | guest RAM written (MiB) | PSS (MiB) "
                   "| RSS later (MiB) | anon later (MiB) | guest RAM written later (MiB) "
                   "| PSS later (MiB) | CPU meanwhile |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n in cl:
            lab = b.rows[n][1]
            ss = S[n]
            ok = [s for s in ss if s["ok"]]
            if not ok:
                out.append(f"| {lab['runner']} | {lab['clones']} | 0/{len(ss)} "
                           + "| – " * 12 + "|")
                continue
            s = ok[-1]
            tot = lambda key, when: sum(m.get(key, 0) for m in s[when]) / 1024
            out.append(
                f"| {lab['runner']} | {lab['clones']} | {len(ok)}/{len(ss)} "
                f"| {ms(s['spawn_s']):.0f} | {ms(s['all_s']):.0f} | {trip([ms(x) for x in s['per_clone_s']], '{:.0f}')} "
                f"| {tot('VmRSS', 'mem_running'):.1f} | {tot('RssAnon', 'mem_running'):.1f} "
                f"| {tot('GuestAnon', 'mem_running'):.1f} | {tot('Pss', 'mem_running'):.1f} "
                f"| {tot('VmRSS', 'mem_after'):.1f} | {tot('RssAnon', 'mem_after'):.1f} "
                f"| {tot('GuestAnon', 'mem_after'):.1f} | {tot('Pss', 'mem_after'):.1f} | {s['cpu_share'] * 100:.0f} % |")
    out.append("")
    out.extend(failed_runs(S, b.order))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ferrovisor", required=True)
    ap.add_argument("--vm", action="append", default=[], metavar="BACKEND::ARGS::CMDLINE",
                    help="a back end to measure: `ferrovisor run` arguments (shell words) "
                         "and the guest command line for a guest counting without pause")
    ap.add_argument("--clone-cmdline", action="append", default=[], metavar="BACKEND::CMDLINE",
                    help="the guest command line for BACKEND's clone snapshot")
    ap.add_argument("--peer", action="append", default=[], metavar="BACKEND::NAME::COMMAND",
                    help="QEMU command line (without -m, -append, -qmp) for BACKEND's peer")
    ap.add_argument("--sizes", default="256M,1G,4G")
    ap.add_argument("--runs", "-n", type=int, default=5)
    ap.add_argument("--clones", default="1,10,50", help="clone counts, or empty for none")
    ap.add_argument("--clone-memory", default="256M")
    ap.add_argument("--clone-count-ms", type=int, default=100, help="(for the report)")
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--gap", type=float, default=0.3,
                    help="seconds the VM runs between two snapshots")
    ap.add_argument("--timeout", type=float, default=30.0, help="per restore")
    ap.add_argument("--boot-timeout", type=float, default=240.0)
    ap.add_argument("--work", required=True, help="directory for snapshots and sockets")
    ap.add_argument("--log-dir", required=True)
    ap.add_argument("--json")
    ap.add_argument("--quiet", "-q", action="store_true")
    a = ap.parse_args()
    a.sizes = [s for s in a.sizes.split(",") if s]
    a.clones = [int(k) for k in a.clones.split(",") if k]
    vms = []
    for spec in a.vm:
        parts = spec.split("::")
        if len(parts) != 3:
            ap.error(f"--vm wants BACKEND::ARGS::CMDLINE, got {spec!r}")
        vms.append((parts[0], shlex.split(parts[1]), parts[2]))
    clone_cmd = dict(s.split("::", 1) for s in a.clone_cmdline)
    peers = {}
    a.peer_names = {}
    for spec in a.peer:
        parts = spec.split("::", 2)
        if len(parts) != 3:
            ap.error(f"--peer wants BACKEND::NAME::COMMAND, got {spec!r}")
        peers[parts[0]] = shlex.split(parts[2])
        a.peer_names[parts[0]] = parts[1]
    os.makedirs(a.log_dir, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)

    b = Bench(a)
    for backend, vmargs, cmdline in vms:
        for mem in a.sizes:
            work = os.path.join(a.work, f"{backend}-{mem}")
            os.makedirs(work, exist_ok=True)
            b.progress(f"ferrovisor {backend} {mem}: snapshots")
            snaps = b.fv_snapshots(backend, mem, vmargs, cmdline, work)
            b.progress(f"ferrovisor {backend} {mem}: restores")
            b.fv_restores(backend, mem, snaps, work)
            for d, _ in snaps:
                shutil.rmtree(d, ignore_errors=True)
            if backend in peers:
                b.progress(f"{a.peer_names[backend]} {mem}: save and restore")
                b.qemu(backend, mem, peers[backend], cmdline, work)
            shutil.rmtree(work, ignore_errors=True)
        if a.clones and backend in clone_cmd:
            work = os.path.join(a.work, f"{backend}-clones")
            os.makedirs(work, exist_ok=True)
            b.clones(backend, vmargs, clone_cmd[backend], work)
            shutil.rmtree(work, ignore_errors=True)

    print(report(b), end="")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": a.runs, "sizes": a.sizes, "order": b.order,
                       "rows": b.rows, "samples": b.samples}, f, indent=1)
    ok = all(s["ok"] for ss in b.samples.values() for s in ss)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
