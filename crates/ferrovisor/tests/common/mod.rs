//! Shared harness of the integration tests: run the `ferrovisor` binary on a guest with a
//! timeout, capture what the guest printed, and decide whether a test can run on this host.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod netns;
pub mod vmm;

pub const BIN: &str = env!("CARGO_BIN_EXE_ferrovisor");

/// Why KVM tests cannot run here, or `None` if they can.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm cannot be opened ({e})")),
    }
}

/// Prints a loud SKIPPED line and returns true when KVM is missing.
pub fn skip_without_kvm(test: &str) -> bool {
    if let Some(reason) = kvm_unavailable() {
        eprintln!("SKIPPED {test}: {reason}");
        return true;
    }
    false
}

/// Why an unmodified Linux kernel cannot run on this host's KVM, or `None` if it can.
pub fn linux_on_kvm_unavailable() -> Option<String> {
    if let Some(reason) = kvm_unavailable() {
        return Some(reason);
    }
    let hw =
        Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists();
    if !hw {
        let backend = if Path::new("/sys/module/kvm_pvm").exists() {
            "KVM is served by PVM (kvm_pvm), a software back end that cannot run an unmodified Linux kernel"
        } else {
            "no kvm_intel or kvm_amd module: KVM has no hardware virtualization here"
        };
        return Some(backend.into());
    }
    None
}

pub fn test_guest_bzimage() -> PathBuf {
    test_guests::bzimage().to_path_buf()
}

pub fn test_guest_pvh() -> PathBuf {
    test_guests::pvh_elf().to_path_buf()
}

/// What a finished run left behind.
#[derive(Debug)]
pub struct RunResult {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl RunResult {
    /// The guest's `ftg: ` lines without the prefix.
    pub fn guest_lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("ftg: "))
            .collect()
    }

    /// The value after `key` in the first guest line starting with `line_start`.
    pub fn field(&self, line_start: &str, key: &str) -> Option<String> {
        let line = self
            .guest_lines()
            .into_iter()
            .find(|l| l.starts_with(line_start))?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    }

    pub fn has_line(&self, line: &str) -> bool {
        self.guest_lines().contains(&line)
    }
}

impl std::fmt::Display for RunResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The back end of `ferrovisor run` unless a test names one: KVM, so these tests exercise
/// the hardware-assisted path even where `auto` would pick the emulator.
pub const DEFAULT_TEST_BACKEND: &str = "kvm";

/// `args` with `--backend kvm` added to a `run` that names no back end.
pub fn with_backend<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    if v.first() == Some(&"run") && !v.contains(&"--backend") {
        v.insert(1, "--backend");
        v.insert(2, DEFAULT_TEST_BACKEND);
    }
    v
}

/// Starts `ferrovisor` with `args`, stdin and stdout piped.
pub fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .args(with_backend(args))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferrovisor")
}

/// Takes `child`'s stdout and streams it, chunk by chunk, to the returned receiver (for tests
/// that act on what the guest prints while it runs).
pub fn stream_stdout(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let mut stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    rx
}

/// Appends streamed output to `seen` until it contains `what`; false on timeout.
pub fn wait_for_output(
    rx: &std::sync::mpsc::Receiver<String>,
    seen: &mut String,
    what: &str,
    timeout: Duration,
) -> bool {
    let start = Instant::now();
    while !seen.contains(what) {
        if start.elapsed() > timeout {
            return false;
        }
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push_str(&chunk);
        }
    }
    true
}

/// Waits for `child` to exit (killing it after `timeout`) and collects its output.
pub fn finish(mut child: Child, timeout: Duration) -> RunResult {
    // The caller may have taken stdout to read it live; then there is nothing left to collect.
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut out) = stdout {
            let _ = out.read_to_end(&mut s);
        }
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut err) = stderr {
            let _ = err.read_to_end(&mut s);
        }
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ferrovisor") {
            break Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&out_thread.join().unwrap_or_default()).into_owned();
    let mut stderr = String::from_utf8_lossy(&err_thread.join().unwrap_or_default()).into_owned();
    if status.is_none() {
        stderr.push_str(&format!("\n[test harness: killed after {timeout:?}]"));
    }
    RunResult {
        code: status.and_then(|s| s.code()),
        stdout,
        stderr,
    }
}

/// Runs `ferrovisor` with `args` and `input` on stdin (then EOF), with a timeout.
pub fn run(args: &[&str], input: &[u8], timeout: Duration) -> RunResult {
    let mut child = spawn(args);
    {
        let mut stdin = child.stdin.take().expect("stdin piped");
        let _ = stdin.write_all(input);
    }
    finish(child, timeout)
}

/// Runs the test guest `kernel` with the given guest options (appended to the cmdline).
pub fn run_test_guest(kernel: &Path, extra: &[&str], options: &str) -> RunResult {
    let cmdline = format!("console=ttyS0 {options}");
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    run(&args, b"", Duration::from_secs(60))
}

/// FNV-1a 64, as the test guest computes over the initrd.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A Linux guest fixture from `scripts/fetch-guest-fixtures.sh` (or `$FERROVISOR_FIXTURES`).
pub fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("FERROVISOR_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"));
    let p = dir.join(name);
    // The emulator runs everywhere, so a missing fixture is a broken setup, not a skip.
    assert!(
        p.is_file(),
        "{p:?} missing: run scripts/fetch-guest-fixtures.sh"
    );
    p
}

/// A private, writable copy of the test root file system image (rootfs.ext4) in `dir`.
pub fn root_copy(dir: &TempDir) -> PathBuf {
    let p = dir.0.join("root.ext4");
    std::fs::copy(fixture("rootfs.ext4"), &p).expect("copy rootfs.ext4");
    p
}

/// `ferrovisor run` arguments for the test guest on `backend` counting on the console
/// (`ftg: count N`) every 20 ms until it is stopped.
pub fn counting_test_guest_args(backend: &str) -> Vec<String> {
    let guest = test_guest_bzimage();
    [
        "run",
        "--backend",
        backend,
        "--kernel",
        guest.to_str().expect("utf-8 path"),
        "--cmdline",
        "console=ttyS0 ftg.count=forever ftg.count_ms=20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `ferrovisor run` arguments that boot Debian's kernel and the initramfs on the emulator with
/// `memory` of RAM and `console=ttyS0 panic=-1 CMDLINE`; `extra` follows.
pub fn initramfs_guest_args(memory: &str, cmdline: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "run".into(),
        "--backend".into(),
        "emu".into(),
        "--kernel".into(),
        fixture("vmlinuz").display().to_string(),
        "--initrd".into(),
        fixture("initramfs.cpio.gz").display().to_string(),
        "--memory".into(),
        memory.into(),
        "--cmdline".into(),
        format!("console=ttyS0 panic=-1 {cmdline}"),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `ferrovisor run` arguments that boot Debian's kernel on the emulator with `memory` of RAM,
/// its root file system on the first disk (`root`, e.g. from [`root_copy`]) and a shell on
/// the console, the root's init printing FERROVISOR-ROOT-READY; `extra` (more devices)
/// follows.
pub fn root_guest_args(root: &Path, memory: &str, extra: &[&str]) -> Vec<String> {
    let disk = format!("path={}", root.display());
    let mut a = vec!["--disk", disk.as_str()];
    a.extend_from_slice(extra);
    initramfs_guest_args(memory, "ferrovisor.root=/dev/vda ferrovisor.shell=1", &a)
}

/// `ferrovisor run --restore DIR --backend BACKEND` and `extra`.
pub fn restore_args(dir: &Path, backend: &str, extra: &[impl AsRef<str>]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "run".into(),
        "--restore".into(),
        dir.display().to_string(),
        "--backend".into(),
        backend.into(),
    ];
    a.extend(extra.iter().map(|s| s.as_ref().to_string()));
    a
}

/// The value of the guest's output line `KEY=value`: the last such line, as the terminal's
/// echo of a typed command comes before the command's output.
pub fn console_value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

/// Runs `ferrovisor run` on the emulator with the Linux fixture kernel and `flag VALUE` for
/// each of `values`, for settings it must refuse before the guest starts.
pub fn run_refused(flag: &str, values: &[impl AsRef<str>]) -> RunResult {
    let kernel = fixture("vmlinuz");
    let mut a = vec![
        "run",
        "--backend",
        "emu",
        "--kernel",
        kernel.to_str().unwrap(),
    ];
    for v in values {
        a.extend_from_slice(&[flag, v.as_ref()]);
    }
    run(&a, b"", Duration::from_secs(60))
}

/// A scratch directory removed at drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ferrovisor-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
