//! virtio-balloon with Debian's cloud kernel (6.1) on the emulator back end, root on
//! virtio-blk, a 1 GiB guest, the balloon driven through its control socket:
//! - without DEFLATE_ON_OOM: the guest fills 600 MiB of tmpfs and frees it (the VMM's RSS
//!   grows), then the target goes to 512 MiB: the guest's MemTotal drops by exactly 512 MiB
//!   (Linux takes ballooned pages out of totalram) and the VMM's RSS by most of it; target 0
//!   gives MemTotal back; the guest's statistics reach the socket;
//! - with DEFLATE_ON_OOM and a 768 MiB target at boot: MemTotal stays (Linux leaves totalram
//!   alone), MemAvailable drops, and a 400 MiB tmpfs write still succeeds: the driver
//!   deflates the balloon instead of OOM-killing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ChildStdin;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::*;

const ROOT_MARKER: &str = "FERROVISOR-ROOT-READY";
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

/// The VMM, killed if the test fails before it ends.
struct Vmm(Option<std::process::Child>);

impl Vmm {
    fn pid(&self) -> u32 {
        self.0.as_ref().expect("the VMM is running").id()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A guest with its shell on the console.
struct Guest {
    vmm: Vmm,
    stdin: ChildStdin,
    rx: Receiver<String>,
    seen: String,
}

impl Guest {
    /// Boots a 1 GiB guest with root on a copy of rootfs.ext4 and `--balloon balloon`.
    fn boot(dir: &TempDir, balloon: &str) -> Guest {
        let root = root_copy(dir);
        let args = root_guest_args(&root, "1G", &["--balloon", balloon]);
        let mut child = spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let rx = stream_stdout(&mut child);
        let stdin = child.stdin.take().unwrap();
        let mut g = Guest {
            vmm: Vmm(Some(child)),
            stdin,
            rx,
            seen: String::new(),
        };
        let up = wait_for_output(&g.rx, &mut g.seen, ROOT_MARKER, BOOT_TIMEOUT);
        assert!(up, "the root file system never came up:\n{}", g.seen);
        g
    }

    /// Runs `script` in the guest's shell and waits until it is done; returns the output so
    /// far. The marker is computed by the shell, so the terminal's echo of the typed line
    /// does not contain it.
    fn run(&mut self, tag: &str, script: &str) -> &str {
        let line = format!("{script}; echo DONE-$((40+2))-{tag}\n");
        self.stdin.write_all(line.as_bytes()).unwrap();
        let done = format!("DONE-42-{tag}");
        let ok = wait_for_output(&self.rx, &mut self.seen, &done, STEP_TIMEOUT);
        assert!(ok, "the guest never finished {tag}:\n{}", self.seen);
        &self.seen
    }

    /// The guest's MemTotal and MemAvailable, in KiB.
    fn meminfo(&mut self, tag: &str) -> (u64, u64) {
        let out = self.run(
            tag,
            &format!(
                "echo {tag}=$(grep MemTotal: /proc/meminfo | tr -s ' ' | cut -d' ' -f2),\
                 $(grep MemAvailable: /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
            ),
        );
        let v = console_value(out, tag).unwrap_or_else(|| panic!("no {tag} line:\n{out}"));
        let (t, a) = v.split_once(',').expect("total,available");
        (t.parse().unwrap(), a.parse().unwrap())
    }

    /// Powers the guest off and checks the VMM exits cleanly.
    fn power_off(mut self) -> RunResult {
        self.stdin.write_all(b"poweroff -f\n").unwrap();
        let child = self.vmm.0.take().unwrap();
        let mut r = finish(child, STEP_TIMEOUT);
        self.seen.extend(self.rx.iter());
        r.stdout = self.seen;
        r
    }
}

/// Sends one line to the balloon's control socket; returns the reply up to its `ok` or
/// `error: ...` line.
fn control(path: &Path, line: &str) -> String {
    let mut s = UnixStream::connect(path).expect("connect to the balloon control socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    for l in BufReader::new(s).lines() {
        let l = l.expect("read the control reply");
        let last = l == "ok" || l.starts_with("error");
        reply.push_str(&l);
        reply.push('\n');
        if last {
            return reply;
        }
    }
    panic!("the control socket closed mid-reply: {reply}");
}

/// A number in a `stats` reply.
fn stat(reply: &str, key: &str) -> u64 {
    console_value(reply, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the stats reply:\n{reply}"))
}

/// Polls `stats` until the driver reports `bytes` in the balloon; returns the last reply.
fn wait_actual(ctl: &Path, bytes: u64) -> String {
    let start = Instant::now();
    loop {
        let r = control(ctl, "stats");
        if stat(&r, "actual_bytes") == bytes {
            return r;
        }
        assert!(
            start.elapsed() < STEP_TIMEOUT,
            "the balloon never reached {bytes} bytes:\n{r}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The resident set of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[test]
fn inflating_takes_memory_from_the_guest_and_gives_it_to_the_host() {
    let dir = TempDir::new("balloon");
    let ctl = dir.0.join("balloon.sock");
    let mut g = Guest::boot(&dir, &format!("control={}", ctl.display()));

    // The statistics the driver posted when it came up, fresh on request.
    let r = control(&ctl, "stats");
    assert_eq!(stat(&r, "stats_fresh"), 1, "{r}");
    assert_eq!(stat(&r, "target_bytes"), 0, "{r}");
    let (total0, _) = g.meminfo("M0");
    assert!(
        stat(&r, "total_memory").abs_diff(total0 * 1024) <= MIB,
        "total_memory is MemTotal: {r}"
    );
    assert!(stat(&r, "free_memory") > 0, "{r}");

    // Make the guest touch most of its memory, then free it: host RSS is high.
    g.run(
        "FILL",
        "mount -o remount,size=900M /tmp && dd if=/dev/zero of=/tmp/fill bs=1M count=600 \
         2>/dev/null; echo FILL=$?; rm -f /tmp/fill",
    );
    assert_eq!(console_value(&g.seen, "FILL"), Some("0"), "{}", g.seen);
    let (total1, avail1) = g.meminfo("M1");
    let rss1 = rss_kib(g.vmm.pid());
    assert!(
        rss1 > 600 * 1024,
        "the guest's writes are not resident: {rss1} KiB"
    );

    // Inflate by 512 MiB.
    assert_eq!(control(&ctl, "set 512M"), "ok\n");
    let r = wait_actual(&ctl, 512 * MIB);
    assert_eq!(stat(&r, "inflated_pages"), 512 * MIB / 4096, "{r}");
    assert_eq!(stat(&r, "invalid_pfns"), 0, "{r}");
    assert_eq!(stat(&r, "discard_errors"), 0, "{r}");
    let (total2, avail2) = g.meminfo("M2");
    let rss2 = rss_kib(g.vmm.pid());
    eprintln!(
        "balloon 512M: MemTotal {total1} -> {total2} KiB, MemAvailable {avail1} -> {avail2} \
         KiB, VMM RSS {rss1} -> {rss2} KiB"
    );
    // Without DEFLATE_ON_OOM Linux takes ballooned pages out of totalram.
    assert_eq!(
        total1 - total2,
        512 * 1024,
        "MemTotal did not drop by 512 MiB"
    );
    assert!(avail1 - avail2 > 400 * 1024, "MemAvailable did not drop");
    // The pages the guest gave were mostly ones it had touched: most of it left the host.
    assert!(
        rss1.saturating_sub(rss2) > 400 * 1024,
        "the VMM's RSS went from {rss1} to {rss2} KiB"
    );
    // The guest's own statistics follow.
    let r = control(&ctl, "stats");
    assert!(
        stat(&r, "total_memory").abs_diff(total2 * 1024) <= MIB,
        "total_memory after inflating: {r}"
    );

    // Targets beyond guest memory and bad lines are refused; the target stays.
    assert!(control(&ctl, "set 2G").starts_with("error"));
    assert!(control(&ctl, "inflate").starts_with("error"));

    // Deflate: the guest gets it all back.
    assert_eq!(control(&ctl, "set 0"), "ok\n");
    let r = wait_actual(&ctl, 0);
    assert_eq!(stat(&r, "deflated_pages"), 512 * MIB / 4096, "{r}");
    let (total3, avail3) = g.meminfo("M3");
    eprintln!("balloon 0: MemTotal {total3} KiB, MemAvailable {avail3} KiB");
    assert_eq!(total3, total1, "MemTotal did not come back");
    assert!(
        avail3 > avail2 + 400 * 1024,
        "MemAvailable did not come back"
    );

    let r = g.power_off();
    assert_eq!(r.code, Some(0), "{r}");
    assert!(!ctl.exists(), "the control socket outlived the VM");
}

#[test]
fn with_deflate_on_oom_the_guest_takes_memory_back_under_pressure() {
    let dir = TempDir::new("balloon-oom");
    let ctl = dir.0.join("balloon.sock");
    let mut g = Guest::boot(
        &dir,
        &format!("size=768M,deflate_on_oom=on,control={}", ctl.display()),
    );
    // The driver inflates to the boot target on its own.
    wait_actual(&ctl, 768 * MIB);
    let (total0, avail0) = g.meminfo("M0");
    eprintln!("balloon 768M with deflate_on_oom: MemTotal {total0} KiB, MemAvailable {avail0} KiB");
    // With DEFLATE_ON_OOM Linux leaves totalram alone; the pages are simply in use.
    assert!(total0 > 900 * 1024, "MemTotal {total0} KiB dropped");
    assert!(avail0 < 256 * 1024, "MemAvailable {avail0} KiB");

    // More than is free: the driver deflates rather than letting the OOM killer loose.
    g.run(
        "FILL",
        "mount -o remount,size=900M /tmp && dd if=/dev/zero of=/tmp/fill bs=1M count=400 \
         2>/dev/null; echo FILL=$?",
    );
    assert_eq!(console_value(&g.seen, "FILL"), Some("0"), "{}", g.seen);
    assert!(
        !g.seen.contains("Killed process"),
        "the OOM killer ran: {}",
        g.seen
    );
    let r = control(&ctl, "stats");
    eprintln!("after 400 MiB under pressure:\n{r}");
    assert_eq!(stat(&r, "target_bytes"), 768 * MIB, "{r}");
    assert!(stat(&r, "actual_bytes") < 600 * MIB, "{r}");
    assert!(stat(&r, "deflated_pages") > 0, "{r}");

    let r = g.power_off();
    assert_eq!(r.code, Some(0), "{r}");
}
