//! The console on a terminal: raw mode (keys go to the guest as typed), Ctrl-A x to quit, and
//! the terminal's settings restored afterwards. Uses a pseudo-terminal as stdin.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

struct Pty {
    master: File,
    slave: OwnedFd,
}

fn open_pty() -> Pty {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors to the given pointers; the other arguments may
    // be null.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty returned two fresh descriptors that nothing else owns.
    unsafe {
        Pty {
            master: File::from_raw_fd(master),
            slave: OwnedFd::from_raw_fd(slave),
        }
    }
}

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data, filled by tcgetattr on a valid terminal descriptor.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(fd.as_raw_fd(), &mut t), 0);
        t.c_lflag
    }
}

/// Starts the guest with the pty as stdin; returns the child and a reader of its stdout.
fn start(pty: &Pty, options: &str) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let kernel = test_guest_bzimage();
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--backend",
            "kvm",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            &format!("console=ttyS0 {options}"),
        ])
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = stream_stdout(&mut child);
    (child, rx)
}

fn wait_for(rx: &std::sync::mpsc::Receiver<String>, seen: &mut String, what: &str) {
    assert!(
        wait_for_output(rx, seen, what, Duration::from_secs(30)),
        "no {what:?} in {seen}"
    );
}

#[test]
fn terminal_input_is_raw_and_reaches_the_guest() {
    if skip_without_kvm("terminal_input_is_raw_and_reaches_the_guest") {
        return;
    }
    let mut pty = open_pty();
    let cooked = lflag(&pty.slave);
    let (child, rx) = start(&pty, "ftg.smp=0 ftg.echo=1");
    let mut seen = String::new();
    wait_for(&rx, &mut seen, "ftg: ready for input");
    assert_eq!(
        lflag(&pty.slave) & libc::ICANON,
        0,
        "raw mode while the VM runs"
    );
    // A carriage return, as a terminal sends for Enter, must reach the guest unchanged.
    pty.master.write_all(b"raw keys\r").unwrap();
    wait_for(&rx, &mut seen, "ftg: echo raw keys");
    let r = finish(child, Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(lflag(&pty.slave), cooked, "terminal settings restored");
}

#[test]
fn ctrl_a_x_quits_and_restores_the_terminal() {
    if skip_without_kvm("ctrl_a_x_quits_and_restores_the_terminal") {
        return;
    }
    let mut pty = open_pty();
    let cooked = lflag(&pty.slave);
    let (child, rx) = start(&pty, "ftg.quick=1 ftg.action=halt");
    let mut seen = String::new();
    wait_for(&rx, &mut seen, "ftg: hello");
    pty.master.write_all(b"\x01x").unwrap();
    let r = finish(child, Duration::from_secs(30));
    assert_eq!(r.code, Some(130), "{r}");
    assert!(r.stderr.contains("quit from the console"), "{r}");
    assert_eq!(lflag(&pty.slave), cooked, "terminal settings restored");
}
