//! A running `ferrovisor run ... --api-sock SOCK` for the tests that drive a VM while it runs:
//! its console streamed in, its stdin to type on, `ferrovisor ctl` on its socket, and a kill
//! when the test fails before the VMM ends.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use super::netns::NetNs;
use super::{stream_stdout, wait_for_output, with_backend, RunResult, BIN};

/// How long [`Vmm::wait_for`] waits, and [`Vmm::start`] for the API socket.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a `ferrovisor ctl` may take.
const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `ferrovisor ctl --sock SOCK ARGS`.
pub fn ctl(sock: &Path, args: &[&str]) -> RunResult {
    let mut a = vec!["ctl", "--sock", sock.to_str().unwrap()];
    a.extend_from_slice(args);
    super::run(&a, b"", CTL_TIMEOUT)
}

/// Asserts that `r` (of `what`) exited 0.
pub fn ok(r: &RunResult, what: &str) {
    assert_eq!(r.code, Some(0), "{what} failed: {}{}", r.stdout, r.stderr);
}

/// The first `KEY=value` the guest printed in `out`, as [`Vmm::wait_for_value`] finds it. A
/// kernel message can land on the console right after the value, on the same line (printk
/// does not wait for a newline from user space): it is not part of the value.
pub fn guest_value(out: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    out.match_indices(&pat).find_map(|(i, _)| {
        let rest = &out[i + pat.len()..];
        let line = &rest[..rest.find(['\r', '\n'])?];
        let v = line[..printk_at(line).unwrap_or(line.len())].trim();
        (!v.is_empty() && !v.starts_with('$')).then(|| v.to_string())
    })
}

/// Where a kernel message's timestamp (`[    5.695808]`) starts in `line`, if one does.
fn printk_at(line: &str) -> Option<usize> {
    line.match_indices('[').map(|(i, _)| i).find(|&i| {
        let rest = &line[i + 1..];
        let Some(end) = rest.find(']') else {
            return false;
        };
        let stamp = rest[..end].trim_start();
        let (secs, frac) = stamp.split_once('.').unwrap_or(("", ""));
        !secs.is_empty()
            && secs.bytes().all(|b| b.is_ascii_digit())
            && frac.len() == 6
            && frac.bytes().all(|b| b.is_ascii_digit())
    })
}

/// A running `ferrovisor run` with its API socket, its console input and streamed output;
/// killed if the test fails before it ends.
pub struct Vmm {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    out: Receiver<String>,
    /// Everything the console has shown so far.
    pub seen: String,
    pub sock: PathBuf,
}

impl Vmm {
    /// Starts `ferrovisor ARGS --api-sock SOCK` (on KVM if a `run` names no back end) and
    /// waits for the API socket, which appears before the guest starts.
    pub fn start(args: &[String], sock: &Path) -> Vmm {
        Vmm::start_in(args, sock, None)
    }

    /// [`Vmm::start`] inside network namespace `netns` if given.
    pub fn start_in(args: &[String], sock: &Path, netns: Option<&NetNs>) -> Vmm {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.extend_from_slice(&["--api-sock", sock.to_str().unwrap()]);
        let mut cmd = match netns {
            Some(ns) => ns.command(BIN),
            None => Command::new(BIN),
        };
        cmd.args(with_backend(&a))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start ferrovisor");
        let out = stream_stdout(&mut child);
        let stdin = child.stdin.take();
        let mut vmm = Vmm {
            child: Some(child),
            stdin,
            out,
            seen: String::new(),
            sock: sock.to_owned(),
        };
        let start = Instant::now();
        while !sock.exists() {
            let exited = vmm.child.as_mut().unwrap().try_wait().unwrap().is_some();
            if exited || start.elapsed() > WAIT_TIMEOUT {
                vmm.fail(&format!("no API socket at {sock:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        vmm
    }

    /// Panics with `why`, the console so far and the VMM's stderr (killing the VMM if it has
    /// not ended within 2 s of its console closing).
    pub fn fail(&mut self, why: &str) -> ! {
        self.stdin = None;
        let rest = self
            .child
            .take()
            .map(|c| super::finish(c, Duration::from_secs(2)));
        while let Ok(chunk) = self.out.try_recv() {
            self.seen.push_str(&chunk);
        }
        panic!(
            "{why}; the console showed:\n{}\n--- VMM stderr ---\n{}",
            self.seen,
            rest.map(|r| r.stderr).unwrap_or_default()
        );
    }

    /// Waits up to [`WAIT_TIMEOUT`] until the console shows `what`.
    pub fn wait_for(&mut self, what: &str) {
        self.wait_for_within(what, WAIT_TIMEOUT);
    }

    /// Waits up to `timeout` until the console shows `what`.
    pub fn wait_for_within(&mut self, what: &str, timeout: Duration) {
        if !wait_for_output(&self.out, &mut self.seen, what, timeout) {
            self.fail(&format!("{what:?} not seen within {timeout:?}"));
        }
    }

    /// Waits until the counting guest has printed `count n` (or more).
    pub fn wait_for_count(&mut self, n: u64) {
        self.wait_for(&format!("count {n}\r\n"));
    }

    /// Reads the console until `done(seen)` gives a value; fails with `what` after `timeout`.
    fn wait_until<T>(
        &mut self,
        timeout: Duration,
        what: impl Fn() -> String,
        done: impl Fn(&str) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = done(&self.seen) {
                return v;
            }
            if start.elapsed() > timeout {
                self.fail(&what());
            }
            if let Ok(chunk) = self.out.recv_timeout(Duration::from_millis(100)) {
                self.seen.push_str(&chunk);
            }
        }
    }

    /// Waits until the console has shown `what` `n` times.
    pub fn wait_for_n(&mut self, what: &str, n: usize, timeout: Duration) {
        self.wait_until(
            timeout,
            || format!("{what:?} not seen {n} times within {timeout:?}"),
            |seen| (seen.matches(what).count() >= n).then_some(()),
        );
    }

    /// Waits until the console shows one of `whats` after its first `from` bytes; which.
    pub fn wait_for_any(&mut self, from: usize, whats: &[&str], timeout: Duration) -> String {
        self.wait_until(
            timeout,
            || format!("none of {whats:?} seen within {timeout:?}"),
            |seen| {
                whats
                    .iter()
                    .find(|w| seen[from..].contains(**w))
                    .map(|w| w.to_string())
            },
        )
    }

    /// Waits for the guest to print `KEY=value` (anywhere in a line: a background job may
    /// print after a prompt) and returns the value; the echo of a typed command, whose value
    /// starts with `$` or is empty where the terminal wrapped the line, does not count.
    pub fn wait_for_value(&mut self, key: &str, timeout: Duration) -> String {
        self.wait_until(
            timeout,
            || format!("no {key}=<value> within {timeout:?}"),
            |seen| guest_value(seen, key),
        )
    }

    /// Types `bytes` on the guest's console.
    pub fn type_in(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("console open");
        if let Err(e) = stdin.write_all(bytes).and_then(|()| stdin.flush()) {
            let typed = String::from_utf8_lossy(bytes).into_owned();
            self.fail(&format!("cannot type {typed:?}: {e}"));
        }
    }

    /// Types `line` (a newline is added) on the guest's console.
    pub fn type_line(&mut self, line: &str) {
        self.type_in(format!("{line}\n").as_bytes());
    }

    /// Runs `ferrovisor ctl --sock SOCK ARGS` on this VMM.
    pub fn ctl(&self, args: &[&str]) -> RunResult {
        ctl(&self.sock, args)
    }

    /// Runs `ferrovisor ctl` on this VMM and insists it succeeds.
    pub fn ctl_ok(&mut self, args: &[&str]) {
        let r = self.ctl(args);
        if r.code != Some(0) {
            self.fail(&format!("ctl {args:?} failed: {r}"));
        }
    }

    /// Runs `ferrovisor ctl --sock SOCK shutdown --timeout TIMEOUT_S` (given 90 s to answer).
    pub fn shutdown(&self, timeout_s: &str) -> RunResult {
        let a = [
            "ctl",
            "--sock",
            self.sock.to_str().unwrap(),
            "shutdown",
            "--timeout",
            timeout_s,
        ];
        super::run(&a, b"", Duration::from_secs(90))
    }

    /// Pauses, snapshots into `dir` and kills the VM; its exit must be clean.
    pub fn snapshot_and_kill(mut self, dir: &Path) -> String {
        self.ctl_ok(&["pause"]);
        self.ctl_ok(&["snapshot", dir.to_str().unwrap()]);
        self.ctl_ok(&["kill"]);
        let (seen, r) = self.finish(Duration::from_secs(30));
        assert_eq!(r.code, Some(0), "the killed VMM: {r}\n{seen}");
        seen
    }

    /// Closes the console, waits for the VMM to end (killing it after `timeout`): everything
    /// the console showed and how the VMM ended.
    pub fn finish(mut self, timeout: Duration) -> (String, RunResult) {
        self.stdin = None;
        let child = self.child.take().expect("finish once");
        let r = super::finish(child, timeout);
        while let Ok(chunk) = self.out.recv_timeout(Duration::from_millis(200)) {
            self.seen.push_str(&chunk);
        }
        (std::mem::take(&mut self.seen), r)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
