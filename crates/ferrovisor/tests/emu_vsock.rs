//! virtio-vsock with Debian's cloud kernel on the emulator back end, root on virtio-blk, the
//! guest side played by /usr/bin/vsock-test (scripts/lib/vsock-test.c) in rootfs.ext4:
//! - host to guest: the test connects to the VMM's unix socket, asks for guest port 5000
//!   with `CONNECT 5000\n`, gets `OK <port>\n`, and 1 MiB goes through the guest's echo
//!   (inverted) and back, while it is being sent; a port nobody listens on closes the client;
//! - guest to host: the guest connects to CID 2 port 6000, which reaches the test's socket
//!   `<uds>_6000`; the test checks what it sent and replies; port 6001 is refused;
//! - the stale socket file left at the path is replaced, and the VMM removes its socket when
//!   the VM ends; a path in use, a missing directory or a reserved CID stop it before the
//!   guest starts.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::*;

const ROOT_MARKER: &str = "FERROVISOR-ROOT-READY";
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const GUEST_CID: u32 = 3;
/// Bytes the host sends through the guest's echo.
const ECHO_BYTES: usize = 1 << 20;
/// Bytes the guest sends to the host.
const GUEST_BYTES: usize = 200_000;

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// FNV-1a 32, as vsock-test computes it.
fn fnv1a32(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The VMM, killed if the test fails before it ends.
struct Vmm(Option<std::process::Child>);

impl Vmm {
    fn take(&mut self) -> std::process::Child {
        self.0.take().expect("the VMM is still running")
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

/// Boots the guest with root on a copy of rootfs.ext4 and a vsock device on `uds`.
fn boot(dir: &TempDir, uds: &Path) -> (Vmm, Receiver<String>, String) {
    let root = root_copy(dir);
    let vsock = format!("cid={GUEST_CID},uds={}", uds.display());
    let args = root_guest_args(&root, "256M", &["--vsock", &vsock]);
    let mut child = spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let rx = stream_stdout(&mut child);
    let vmm = Vmm(Some(child));
    let mut seen = String::new();
    let up = wait_for_output(&rx, &mut seen, ROOT_MARKER, BOOT_TIMEOUT);
    assert!(up, "the root file system never came up:\n{seen}");
    (vmm, rx, seen)
}

/// Reads one line (up to `\n`) from `s`; `None` at end of file first.
fn read_line(s: &mut UnixStream) -> Option<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => return Some(String::from_utf8_lossy(&line).into()),
            Ok(1) => line.push(b[0]),
            Ok(_) => return None,
            Err(e) => panic!("reading from the vsock socket: {e}"),
        }
    }
}

/// A host client asking for guest port `port`.
fn connect(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).expect("connect to the vsock socket");
    s.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    s
}

#[test]
fn streams_flow_both_ways_between_host_sockets_and_guest_vsock() {
    let dir = TempDir::new("vsock");
    let uds = dir.0.join("v.sock");
    // A stale socket file: its listener is gone.
    drop(UnixListener::bind(&uds).unwrap());
    let port_path = PathBuf::from(format!("{}_6000", uds.display()));
    let host_listener = UnixListener::bind(&port_path).unwrap();

    let (mut vmm, rx, mut seen) = boot(&dir, &uds);
    let mut stdin = vmm.0.as_mut().unwrap().stdin.take().unwrap();

    // Nobody listens on guest port 5001: the client is closed without an answer.
    let mut refused = connect(&uds, 5001);
    assert_eq!(read_line(&mut refused), None, "guest port 5001 answered");

    // Host to guest.
    stdin.write_all(b"vsock-test listen 5000 &\n").unwrap();
    assert!(
        wait_for_output(&rx, &mut seen, "VSOCK-LISTENING=5000", STEP_TIMEOUT),
        "vsock-test never listened:\n{seen}"
    );
    let mut s = connect(&uds, 5000);
    let ok = read_line(&mut s).expect("an answer to CONNECT");
    let host_port: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("answer {ok:?} is not OK <port>"));
    assert!(host_port > 1024, "host port {host_port}");
    let data = pattern(ECHO_BYTES);
    let sender = {
        let mut w = s.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || {
            w.write_all(&data).expect("send to the guest");
            w.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut echoed = Vec::new();
    s.read_to_end(&mut echoed).expect("the guest's echo");
    sender.join().unwrap();
    assert_eq!(echoed.len(), ECHO_BYTES, "echo length");
    let expected: Vec<u8> = data.iter().map(|b| b ^ 0xff).collect();
    assert!(echoed == expected, "the echo differs from the data sent");
    let want = format!("VSOCK-ECHOED={ECHO_BYTES} {:08x}", fnv1a32(&data));
    assert!(
        wait_for_output(&rx, &mut seen, &want, STEP_TIMEOUT),
        "the guest did not report {want}:\n{seen}"
    );

    // Guest to host.
    let host = std::thread::spawn(move || {
        let (mut c, _) = host_listener.accept().unwrap();
        c.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        let reply = format!("HOST-GOT {} {:08x}\n", got.len(), fnv1a32(&got));
        c.write_all(reply.as_bytes()).unwrap();
        got
    });
    stdin
        .write_all(format!("vsock-test connect 2 6000 {GUEST_BYTES}\n").as_bytes())
        .unwrap();
    assert!(
        wait_for_output(&rx, &mut seen, "VSOCK-REPLY=", STEP_TIMEOUT),
        "the guest's connection never finished:\n{seen}"
    );
    let got = host.join().unwrap();
    assert!(got == pattern(GUEST_BYTES), "the host got other data");
    let reply = format!("HOST-GOT {GUEST_BYTES} {:08x}", fnv1a32(&got));
    assert!(
        wait_for_output(
            &rx,
            &mut seen,
            &format!("VSOCK-REPLY={reply}"),
            STEP_TIMEOUT
        ),
        "the guest did not get the reply {reply}:\n{seen}"
    );
    assert_eq!(console_value(&seen, "VSOCK-SENT"), Some("200000"), "{seen}");

    // Nothing listens on host port 6001.
    stdin.write_all(b"vsock-test connect 2 6001 10\n").unwrap();
    assert!(
        wait_for_output(&rx, &mut seen, "VSOCK-ERROR=connect", STEP_TIMEOUT),
        "a connection to a host port nobody listens on did not fail:\n{seen}"
    );

    stdin.write_all(b"poweroff -f\n").unwrap();
    drop(stdin);
    let mut r = finish(vmm.take(), STEP_TIMEOUT);
    seen.extend(rx.iter());
    r.stdout = seen;
    assert_eq!(r.code, Some(0), "{r}");
    assert!(!uds.exists(), "the VMM left its socket behind");
    assert!(
        port_path.exists(),
        "the VMM removed a socket it does not own"
    );
}

/// Runs `ferrovisor run` with the test kernel and `vsock`, expecting it to refuse to start.
fn refused(vsock: &str) -> RunResult {
    let kernel = fixture("vmlinuz");
    run(
        &[
            "run",
            "--backend",
            "emu",
            "--kernel",
            kernel.to_str().unwrap(),
            "--vsock",
            vsock,
        ],
        b"",
        Duration::from_secs(60),
    )
}

fn assert_refused(r: &RunResult, what: &str) {
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains(what), "{r}");
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {r}");
    assert!(
        !r.stdout.contains("Linux version"),
        "the guest started: {r}"
    );
}

#[test]
fn bad_vsock_settings_fail_before_the_guest_starts_with_one_line() {
    let dir = TempDir::new("vsock-bad");
    let uds = dir.0.join("v.sock");
    let in_use = UnixListener::bind(&uds).unwrap();
    let r = refused(&format!("cid=3,uds={}", uds.display()));
    assert_refused(&r, "is in use");
    assert!(uds.exists(), "the live socket was removed");
    drop(in_use);

    let missing = dir.0.join("no-such-dir/v.sock");
    assert_refused(
        &refused(&format!("cid=3,uds={}", missing.display())),
        "does not exist",
    );
    let file = dir.file("plain", b"data");
    assert_refused(
        &refused(&format!("cid=3,uds={}", file.display())),
        "is not a socket",
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    assert_refused(
        &refused(&format!("cid=2,uds={}", uds.display())),
        "vsock cid 2",
    );
    // A value clap cannot parse: its usage error (code 2, with a hint line).
    let r = refused("cid=3");
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("needs both settings"), "{r}");
}
