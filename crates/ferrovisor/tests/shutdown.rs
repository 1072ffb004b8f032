//! Graceful shutdown through the control API: `ferrovisor ctl shutdown` types Ctrl-Alt-Del on
//! the guest's i8042 keyboard, the guest's init powers off by itself, and the VMM exits 0.
//!
//! The check that matters: the guest's own shutdown message (`FERROVISOR-SHUTDOWN` from the
//! fixtures' init scripts, `ftg: shutdown request` from the test guest) comes before the
//! power-off, so the VM ended because the guest acted on the request, not because the VMM's
//! timeout killed it.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::{fixture, spawn, stream_stdout, wait_for_output, RunResult, TempDir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// What `ctl shutdown` gives the guest before the VMM kills it.
const SHUTDOWN_TIMEOUT_S: &str = "30";
/// Linux's last line when it powers off through ACPI S5.
const LINUX_POWER_DOWN: &str = "reboot: Power down";
/// What the fixtures' init scripts print when they take the shutdown request.
const INIT_SHUTDOWN: &str = "FERROVISOR-SHUTDOWN";

/// A running `ferrovisor run` with its API socket, its console input and streamed output.
struct Vmm {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    out: Receiver<String>,
    seen: String,
    sock: PathBuf,
}

impl Vmm {
    fn start(args: &[String], sock: &Path) -> Vmm {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.extend_from_slice(&["--api-sock", sock.to_str().unwrap()]);
        let mut child = spawn(&a);
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
            if exited || start.elapsed() > BOOT_TIMEOUT {
                let r = common::finish(vmm.child.take().unwrap(), Duration::ZERO);
                panic!("no API socket at {sock:?}: {}{}", r.stdout, r.stderr);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        vmm
    }

    /// Waits until the console shows `what`; panics with the output so far if it does not.
    fn wait_for(&mut self, what: &str) {
        if !wait_for_output(&self.out, &mut self.seen, what, BOOT_TIMEOUT) {
            let rest = self.child.take().map(|c| common::finish(c, Duration::ZERO));
            panic!(
                "no {what:?} on the console; saw:\n{}\nstderr: {}",
                self.seen,
                rest.map(|r| r.stderr).unwrap_or_default()
            );
        }
    }

    /// Types `bytes` on the guest's console.
    fn type_in(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("console input");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Runs `ferrovisor ctl --sock SOCK shutdown --timeout 30`.
    fn shutdown(&self) -> RunResult {
        let a = [
            "ctl",
            "--sock",
            self.sock.to_str().unwrap(),
            "shutdown",
            "--timeout",
            SHUTDOWN_TIMEOUT_S,
        ];
        common::run(&a, b"", Duration::from_secs(90))
    }

    /// Everything the console showed and how the VMM ended (killed if it still runs).
    fn finish(mut self) -> (String, RunResult) {
        drop(self.stdin.take());
        let child = self.child.take().expect("finish once");
        let result = common::finish(child, Duration::from_secs(60));
        while let Ok(chunk) = self.out.recv_timeout(Duration::from_millis(200)) {
            self.seen.push_str(&chunk);
        }
        (std::mem::take(&mut self.seen), result)
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

/// Sends the shutdown request and checks that the guest printed `message` and the VMM exited
/// 0; returns the console output after `message`.
fn shut_down(vmm: Vmm, message: &str) -> String {
    let r = vmm.shutdown();
    assert_eq!(r.code, Some(0), "ctl shutdown: {}{}", r.stdout, r.stderr);
    let (out, result) = vmm.finish();
    assert_eq!(result.code, Some(0), "the VMM: {result}\nconsole:\n{out}");
    let at = out
        .find(message)
        .unwrap_or_else(|| panic!("no {message:?}: the guest did not take the request:\n{out}"));
    out[at + message.len()..].to_string()
}

/// Shuts a Linux guest down and checks that it powered off by itself after its init's
/// message; the whole console output.
fn shut_down_linux(mut vmm: Vmm) -> String {
    let before = std::mem::take(&mut vmm.seen);
    let after = shut_down(vmm, INIT_SHUTDOWN);
    assert!(
        after.contains(LINUX_POWER_DOWN),
        "no {LINUX_POWER_DOWN:?} after {INIT_SHUTDOWN}:\n{after}"
    );
    format!("{before}{after}")
}

/// `run` arguments for Debian's kernel and the initramfs on the emulator.
fn linux_args(cmdline: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "run".into(),
        "--backend".into(),
        "emu".into(),
        "--kernel".into(),
        fixture("vmlinuz").display().to_string(),
        "--initrd".into(),
        fixture("initramfs.cpio.gz").display().to_string(),
        "--memory".into(),
        "256M".into(),
        "--cmdline".into(),
        format!("console=ttyS0 panic=-1 {cmdline}"),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn emu_linux_counting_guest_powers_off_on_shutdown_request() {
    let tmp = TempDir::new("shutdown-count");
    let mut vmm = Vmm::start(
        &linux_args("ferrovisor.count=100", &[]),
        &tmp.0.join("api.sock"),
    );
    // Counting means /init has set its trap and turned ctrl-alt-del into a signal.
    vmm.wait_for("count 3\r\n");
    let out = shut_down_linux(vmm);
    assert!(
        out.contains("serio: i8042 KBD port at 0x60,0x64 irq "),
        "no keyboard port:\n{out}"
    );
}

#[test]
fn emu_linux_shell_powers_off_on_shutdown_request_and_keeps_ctrl_c() {
    let tmp = TempDir::new("shutdown-shell");
    let mut vmm = Vmm::start(
        &linux_args("ferrovisor.shell=1", &[]),
        &tmp.0.join("api.sock"),
    );
    vmm.wait_for("FERROVISOR-GUEST-READY");
    // The shell still takes Ctrl-C: it is not a background job of /init with SIGINT ignored.
    vmm.type_in(b"sleep 1000\n");
    std::thread::sleep(Duration::from_secs(2));
    vmm.type_in(b"\x03");
    vmm.type_in(b"echo CTRL_C=$((40 + 2))\n");
    vmm.wait_for("CTRL_C=42");
    // A command running in the shell does not hold the request up.
    vmm.type_in(b"sleep 1000\n");
    std::thread::sleep(Duration::from_secs(1));
    shut_down_linux(vmm);
}

/// `dumpe2fs -h` of `image`: the superblock, including "Filesystem state".
fn superblock(image: &Path) -> String {
    let out = ["dumpe2fs", "/usr/sbin/dumpe2fs", "/sbin/dumpe2fs"]
        .iter()
        .find_map(|tool| {
            std::process::Command::new(tool)
                .args(["-h", image.to_str().unwrap()])
                .output()
                .ok()
        })
        .expect("dumpe2fs (e2fsprogs, as scripts/fetch-guest-fixtures.sh needs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn emu_linux_root_fs_is_left_clean_on_shutdown_request() {
    let tmp = TempDir::new("shutdown-root");
    let root = common::root_copy(&tmp);
    let args = common::root_guest_args(&root, "256M", &[]);
    let mut vmm = Vmm::start(&args, &tmp.0.join("api.sock"));
    vmm.wait_for("FERROVISOR-ROOT-READY");
    vmm.wait_for(" / ext4 rw");
    // Something writing to the root file system when the request comes.
    vmm.type_in(b"sh -c 'while :; do date >>/root/log; sleep 0.1; done' &\n");
    vmm.type_in(b"echo STARTED=$((1 + 1))\n");
    vmm.wait_for("STARTED=2");
    shut_down_linux(vmm);
    let sb = superblock(&root);
    assert!(
        sb.lines()
            .any(|l| l.starts_with("Filesystem state:") && l.ends_with(" clean")),
        "the root file system was not left clean:\n{sb}"
    );
}

#[test]
fn emu_test_guest_counting_powers_off_on_shutdown_request() {
    let tmp = TempDir::new("shutdown-ftg");
    let guest = common::test_guest_bzimage();
    let args: Vec<String> = [
        "run",
        "--backend",
        "emu",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 ftg.count=forever ftg.count_ms=20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vmm = Vmm::start(&args, &tmp.0.join("api.sock"));
    vmm.wait_for("ftg: count 5\r\n");
    let after = shut_down(vmm, "ftg: shutdown request\r\n");
    assert!(
        !after.contains("ftg: "),
        "the guest went on after the request:\n{after}"
    );
}
