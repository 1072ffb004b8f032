//! Graceful shutdown through the control API: `ferrovisor ctl shutdown` types Ctrl-Alt-Del on
//! the guest's i8042 keyboard, the guest's init powers off by itself, and the VMM exits 0.
//!
//! The check that matters: the guest's own shutdown message (`FERROVISOR-SHUTDOWN` from the
//! fixtures' init scripts, `ftg: shutdown request` from the test guest) comes before the
//! power-off, so the VM ended because the guest acted on the request, not because the VMM's
//! timeout killed it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::vmm::Vmm;
use common::TempDir;

/// What `ctl shutdown` gives the guest before the VMM kills it.
const SHUTDOWN_TIMEOUT_S: &str = "30";
/// Linux's last line when it powers off through ACPI S5.
const LINUX_POWER_DOWN: &str = "reboot: Power down";
/// What the fixtures' init scripts print when they take the shutdown request.
const INIT_SHUTDOWN: &str = "FERROVISOR-SHUTDOWN";

/// Sends the shutdown request and checks that the guest printed `message` and the VMM exited
/// 0; returns the console output after `message`.
fn shut_down(vmm: Vmm, message: &str) -> String {
    let r = vmm.shutdown(SHUTDOWN_TIMEOUT_S);
    assert_eq!(r.code, Some(0), "ctl shutdown: {}{}", r.stdout, r.stderr);
    let (out, result) = vmm.finish(Duration::from_secs(60));
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
fn linux_args(cmdline: &str) -> Vec<String> {
    common::initramfs_guest_args("256M", cmdline, &[])
}

#[test]
fn emu_linux_counting_guest_powers_off_on_shutdown_request() {
    let tmp = TempDir::new("shutdown-count");
    let mut vmm = Vmm::start(&linux_args("ferrovisor.count=100"), &tmp.0.join("api.sock"));
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
    let mut vmm = Vmm::start(&linux_args("ferrovisor.shell=1"), &tmp.0.join("api.sock"));
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
    let args = common::counting_test_guest_args("emu");
    let mut vmm = Vmm::start(&args, &tmp.0.join("api.sock"));
    vmm.wait_for("ftg: count 5\r\n");
    let after = shut_down(vmm, "ftg: shutdown request\r\n");
    assert!(
        !after.contains("ftg: "),
        "the guest went on after the request:\n{after}"
    );
}
