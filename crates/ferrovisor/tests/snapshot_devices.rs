//! Devices that talk to the host keep working after a snapshot is restored, in the restored VM
//! and in clones given their own devices: Debian's kernel on the emulator with root on
//! virtio-blk (a copy of rootfs.ext4, which has /usr/bin/vsock-test and /usr/bin/tcp-xfer).
//!
//! - vsock: the guest listens on port 5000 (`vsock-test listen` in a loop) and holds a
//!   connection open on port 5001 when the snapshot is taken. The restored VM, on a new socket
//!   path, echoes through the listener that kept listening, has its old connection reset, and
//!   reaches the host's socket at the new path. Two clones with their own CID, socket and disk
//!   copy answer at once, each with its own data; the guest's connections to the host, which
//!   the device accepts only from the CID it was given, show the guest took its new CID.
//! - network (root only: a network namespace with a tap): a TCP stream from the host is in
//!   flight when the snapshot is taken and arrives whole in the restored VM, and new streams
//!   of a few MiB go both ways after it, checksums compared.
//!
//! The two vsock tests share one snapshot. Each test runs in its own process under nextest, so
//! the snapshot is kept in a directory named after the test runner's pid and made by whichever
//! test takes its lock first (see [`SharedSnapshot`]).

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::netns::{NetNs, HOST_IP, HOST_PEER, TAP};
use common::vmm::{guest_value, Vmm};
use common::{fixture, stream_stdout, wait_for_output, TempDir, BIN};

const ROOT_MARKER: &str = "FERROVISOR-ROOT-READY";
/// Booting to the root shell (about 30 s alone on the emulator, more on a busy host); nextest
/// ends a test of this binary after 180 s, so waits stay below that to report what was seen.
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);
/// One exchange or console command.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// The CID of the VM the shared snapshot is taken of.
const SNAP_CID: u32 = 3;
/// Guest port of the listener running (in a loop) when the snapshot is taken.
const ECHO_PORT: u32 = 5000;
/// Guest port of the connection open when the snapshot is taken.
const HELD_PORT: u32 = 5001;
/// Bytes echoed on the held connection before the snapshot.
const HELD_BYTES: usize = 1000;
/// Host port the guest connects to (the unix socket `<uds>_6000`).
const HOST_PORT: u32 = 6000;

// ------------------------------------------------------------------------------ helpers

/// `run --restore DIR --backend emu` and `extra`.
fn restore_args(dir: &Path, extra: &[String]) -> Vec<String> {
    common::restore_args(dir, "emu", extra)
}

/// The test's own copy of a root image, taken from `image`.
fn disk_copy(image: &Path, dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.0.join(name);
    std::fs::copy(image, &p).expect("copy the root image");
    p
}

/// What `debugfs` reads from `file` in the ext4 image `image`, trimmed.
fn file_in_image(image: &Path, file: &str) -> String {
    let o = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) is needed for this test");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

// ------------------------------------------------------------------------------ vsock

/// FNV-1a 32, as vsock-test computes it.
fn fnv1a32(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// vsock-test's pattern for `connect`: byte i is i % 251.
fn guest_pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// `n` bytes that differ with `seed`, so data crossing between clones would show.
fn seeded(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Connects to the VMM's vsock socket `uds` and asks for guest port `port`; the stream and the
/// device's answer line (`OK <host port>` when the guest accepted). A request the guest did
/// not answer within the device's timeout (the client is closed without a line) is tried
/// again, as an agent would, and said on stderr.
fn vsock_connect(uds: &Path, port: u32) -> Result<(UnixStream, String), String> {
    let start = Instant::now();
    loop {
        match vsock_connect_once(uds, port) {
            Err(Unanswered) if start.elapsed() < STEP_TIMEOUT => {
                eprintln!("guest port {port}: no answer within the device's timeout; again");
            }
            Err(Unanswered) => return Err(format!("guest port {port}: closed without an answer")),
            Ok(r) => return r,
        }
    }
}

/// The device closed a client without an answer line.
struct Unanswered;

fn vsock_connect_once(
    uds: &Path,
    port: u32,
) -> Result<Result<(UnixStream, String), String>, Unanswered> {
    let start = Instant::now();
    let mut s = loop {
        match UnixStream::connect(uds) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > STEP_TIMEOUT => {
                return Ok(Err(format!("cannot connect to {uds:?}: {e}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    s.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    if let Err(e) = s.write_all(format!("CONNECT {port}\n").as_bytes()) {
        return Ok(Err(format!("CONNECT {port}: {e}")));
    }
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            Ok(_) => return Err(Unanswered),
            Err(e) => {
                return Ok(Err(format!(
                    "guest port {port}: waiting for the answer: {e}"
                )))
            }
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    if !line.starts_with("OK ") {
        return Ok(Err(format!(
            "guest port {port}: answer {line:?} is not OK <port>"
        )));
    }
    Ok(Ok((s, line)))
}

/// Sends `data` through vsock-test's echo on guest port `port` (while reading the echo back)
/// and checks every byte came back inverted.
fn echo_through_guest(uds: &Path, port: u32, data: &[u8]) -> Result<(), String> {
    let (mut s, _) = vsock_connect(uds, port)?;
    let sender = {
        let mut w = s.try_clone().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            w.write_all(&data)?;
            w.shutdown(Shutdown::Write)
        })
    };
    let mut echoed = Vec::new();
    let read = s.read_to_end(&mut echoed);
    let sent = sender.join().unwrap();
    read.map_err(|e| format!("reading the echo after {} bytes: {e}", echoed.len()))?;
    sent.map_err(|e| format!("sending to the guest: {e}"))?;
    if echoed.len() != data.len() {
        return Err(format!(
            "{} bytes echoed of {} sent",
            echoed.len(),
            data.len()
        ));
    }
    if let Some(i) = echoed.iter().zip(data).position(|(e, d)| *e != d ^ 0xff) {
        return Err(format!("the echo differs from the data at byte {i}"));
    }
    Ok(())
}

/// The console line vsock-test prints once it has echoed `data`.
fn echoed_line(data: &[u8]) -> String {
    format!("VSOCK-ECHOED={} {:08x}", data.len(), fnv1a32(data))
}

/// A host program on `<uds>_<port>` for one guest connection: reads to end of stream, answers
/// `HOST-GOT <bytes> <fnv1a-32>` and hands back what it read.
fn host_peer(uds: &Path, port: u32) -> JoinHandle<Result<Vec<u8>, String>> {
    let path = PathBuf::from(format!("{}_{port}", uds.display()));
    let listener = UnixListener::bind(&path).expect("bind the host port's socket");
    std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let start = Instant::now();
        let mut c = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(_) if start.elapsed() > STEP_TIMEOUT + STEP_TIMEOUT => {
                    return Err(format!("no guest connection on {path:?}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        c.set_nonblocking(false).unwrap();
        c.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got)
            .map_err(|e| format!("reading the guest's data: {e}"))?;
        let reply = format!("HOST-GOT {} {:08x}\n", got.len(), fnv1a32(&got));
        c.write_all(reply.as_bytes())
            .map_err(|e| format!("replying: {e}"))?;
        Ok(got)
    })
}

/// Has the guest send `bytes` to host port 6000 (the socket `<uds>_6000`) and checks both
/// ends: the host got vsock-test's pattern, the guest got the host's reply.
fn guest_to_host(vmm: &mut Vmm, uds: &Path, bytes: usize) {
    let host = host_peer(uds, HOST_PORT);
    let from = vmm.seen.len();
    vmm.type_line(&format!("vsock-test connect 2 {HOST_PORT} {bytes}"));
    let reply = format!(
        "VSOCK-REPLY=HOST-GOT {bytes} {:08x}",
        fnv1a32(&guest_pattern(bytes))
    );
    let got = vmm.wait_for_any(from, &[&reply, "VSOCK-ERROR="], STEP_TIMEOUT);
    if got != reply {
        vmm.fail("the guest's connection to the host failed");
    }
    match host.join().unwrap() {
        Ok(data) => assert!(
            data == guest_pattern(bytes),
            "the host got {} other bytes",
            data.len()
        ),
        Err(e) => vmm.fail(&e),
    }
}

/// Waits for the guest's end of the connection that was open at the snapshot to end (the
/// device resets every connection of a restored VM): with an error, or at end of stream after
/// the bytes it had echoed.
fn held_connection_was_reset(vmm: &mut Vmm) {
    let held_end = format!("VSOCK-ECHOED={HELD_BYTES} ");
    let how = vmm.wait_for_any(0, &["VSOCK-ERROR=read", &held_end], STEP_TIMEOUT);
    eprintln!("the connection open at the snapshot ended in the guest with {how:?}");
}

/// A lock on a file (flock), released when dropped.
struct FileLock(File);

impl FileLock {
    fn take(path: &Path) -> FileLock {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .expect("open the lock file");
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {path:?}: {}", std::io::Error::last_os_error());
        FileLock(f)
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: as in `take`.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The vsock snapshot the two vsock tests share: `dir/snap`, taken of a VM with CID 3 on the
/// socket `dir/v.sock` and its root on `dir/root.ext4` (never written again: restores use
/// copies). Made by the first test to take the lock, in a directory named after the test
/// runner's pid; the test that finishes last removes it, and a later run removes one a killed
/// run left behind.
struct SharedSnapshot {
    dir: PathBuf,
    lock: PathBuf,
    user: &'static str,
}

/// The tests that use the shared snapshot.
const SNAPSHOT_USERS: [&str; 2] = ["restore", "clones"];

impl SharedSnapshot {
    fn get(user: &'static str) -> SharedSnapshot {
        let tmp = std::env::temp_dir();
        let runner = std::os::unix::process::parent_id();
        let name = format!("ferrovisor-snapdev-{runner}");
        let dir = tmp.join(&name);
        let lock = tmp.join(format!("{name}.lock"));
        let _held = FileLock::take(&lock);
        // Left by runs that were killed.
        for e in std::fs::read_dir(&tmp).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = n
                .strip_prefix("ferrovisor-snapdev-")
                .map(|p| p.trim_end_matches(".lock"))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
                let _ = std::fs::remove_file(e.path());
            }
        }
        // A snapshot of another ferrovisor build may not restore in this one.
        let stamp = format!("{:?}", std::fs::metadata(BIN).and_then(|m| m.modified()));
        let ready = dir.join("ready");
        if std::fs::read_to_string(&ready).ok().as_deref() != Some(stamp.as_str()) {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let started = Instant::now();
            make_vsock_snapshot(&dir);
            eprintln!("the shared vsock snapshot took {:?}", started.elapsed());
            std::fs::write(&ready, &stamp).unwrap();
        }
        SharedSnapshot { dir, lock, user }
    }

    fn snap(&self) -> PathBuf {
        self.dir.join("snap")
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root.ext4")
    }
}

impl Drop for SharedSnapshot {
    fn drop(&mut self) {
        let _held = FileLock::take(&self.lock);
        let _ = std::fs::write(self.dir.join(format!("done-{}", self.user)), b"");
        if SNAPSHOT_USERS
            .iter()
            .all(|u| self.dir.join(format!("done-{u}")).exists())
        {
            // No one else comes for it: the lock file can go too.
            let _ = std::fs::remove_dir_all(&self.dir);
            let _ = std::fs::remove_file(&self.lock);
        }
    }
}

/// Boots the vsock guest in `dir`, checks one echo through port 5000, leaves a listener on
/// 5000 and an open connection on 5001, and snapshots it into `dir/snap`.
fn make_vsock_snapshot(dir: &Path) {
    let root = dir.join("root.ext4");
    std::fs::copy(fixture("rootfs.ext4"), &root).expect("copy rootfs.ext4");
    let uds = dir.join("v.sock");
    let vsock = format!("cid={SNAP_CID},uds={}", uds.display());
    let args = common::root_guest_args(&root, "256M", &["--vsock", &vsock]);
    let mut vmm = Vmm::start(&args, &dir.join("api.sock"));
    vmm.wait_for_within(ROOT_MARKER, BOOT_TIMEOUT);
    // Each vsock-test accepts one connection: a new one listens after each echo.
    vmm.type_line(&format!(
        "while vsock-test listen {ECHO_PORT}; do :; done &"
    ));
    let listening = format!("VSOCK-LISTENING={ECHO_PORT}");
    vmm.wait_for_n(&listening, 1, STEP_TIMEOUT);
    let data = seeded(100_000, 1);
    if let Err(e) = echo_through_guest(&uds, ECHO_PORT, &data) {
        vmm.fail(&format!("echo before the snapshot: {e}"));
    }
    vmm.wait_for_within(&echoed_line(&data), STEP_TIMEOUT);
    vmm.wait_for_n(&listening, 2, STEP_TIMEOUT);
    // A connection open across the snapshot.
    vmm.type_line(&format!("vsock-test listen {HELD_PORT} &"));
    vmm.wait_for_within(&format!("VSOCK-LISTENING={HELD_PORT}"), STEP_TIMEOUT);
    let held = vsock_connect(&uds, HELD_PORT).map(|(s, _)| s);
    let mut held = held.unwrap_or_else(|e| vmm.fail(&e));
    held.write_all(&[0x55; HELD_BYTES]).unwrap();
    let mut back = [0u8; HELD_BYTES];
    if let Err(e) = held.read_exact(&mut back) {
        vmm.fail(&format!("echo on the held connection: {e}"));
    }
    assert!(back.iter().all(|&b| b == 0xaa), "the held echo differs");
    vmm.snapshot_and_kill(&dir.join("snap"));
    drop(held);
}

#[test]
fn emu_vsock_works_after_restore_on_a_new_socket_path() {
    let started = Instant::now();
    let shared = SharedSnapshot::get("restore");
    let tmp = TempDir::new("snapdev-vsock");
    let root = disk_copy(&shared.root(), &tmp, "root.ext4");
    let uds = tmp.0.join("v2.sock");
    let args = restore_args(
        &shared.snap(),
        &[
            "--disk".into(),
            format!("path={}", root.display()),
            "--vsock".into(),
            format!("cid={SNAP_CID},uds={}", uds.display()),
        ],
    );
    let mut vmm = Vmm::start(&args, &tmp.0.join("api.sock"));
    // The listener that was listening at the snapshot still is, on the new socket.
    let data = seeded(300_000, 2);
    if let Err(e) = echo_through_guest(&uds, ECHO_PORT, &data) {
        vmm.fail(&format!("host to guest after the restore: {e}"));
    }
    vmm.wait_for_within(&echoed_line(&data), STEP_TIMEOUT);
    held_connection_was_reset(&mut vmm);
    // Guest to host reaches the new path's port socket.
    guest_to_host(&mut vmm, &uds, 150_000);
    // And the loop listens again: a second echo.
    let data = seeded(50_000, 3);
    if let Err(e) = echo_through_guest(&uds, ECHO_PORT, &data) {
        vmm.fail(&format!("second echo after the restore: {e}"));
    }
    vmm.wait_for_within(&echoed_line(&data), STEP_TIMEOUT);
    vmm.type_line("poweroff -f");
    let (seen, r) = vmm.finish(STEP_TIMEOUT);
    assert_eq!(r.code, Some(0), "{r}\n{seen}");
    assert!(
        !uds.exists(),
        "the restored VMM left its vsock socket behind"
    );
    eprintln!("console after the restore:\n{seen}");
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn emu_vsock_clones_answer_at_once_each_on_its_own_cid_socket_and_disk() {
    let started = Instant::now();
    let shared = SharedSnapshot::get("clones");
    let tmp = TempDir::new("snapdev-clones");
    struct Clone {
        vmm: Vmm,
        uds: PathBuf,
        root: PathBuf,
    }
    let mut clones: Vec<Clone> = (0..2u32)
        .map(|i| {
            let root = disk_copy(&shared.root(), &tmp, &format!("root{i}.ext4"));
            let uds = tmp.0.join(format!("c{i}.sock"));
            let args = restore_args(
                &shared.snap(),
                &[
                    "--disk".into(),
                    format!("path={}", root.display()),
                    "--vsock".into(),
                    format!("cid={},uds={}", SNAP_CID + 1 + i, uds.display()),
                ],
            );
            let vmm = Vmm::start(&args, &tmp.0.join(format!("api{i}.sock")));
            Clone { vmm, uds, root }
        })
        .collect();
    // Guest to host as the first thing clone 1 does: the device takes packets only from the
    // CID it was given, so this works only if the guest took its new CID at the transport
    // reset, before it sent anything.
    let c = &mut clones[1];
    held_connection_was_reset(&mut c.vmm);
    guest_to_host(&mut c.vmm, &c.uds, 20_111);
    // Host to guest, both clones at once, each with its own data.
    let datas: Vec<Vec<u8>> = (0..2)
        .map(|i| seeded(400_000 + i * 1000, 10 + i as u32))
        .collect();
    let echoes: Vec<_> = clones
        .iter()
        .zip(&datas)
        .map(|(c, data)| {
            let (uds, data) = (c.uds.clone(), data.clone());
            std::thread::spawn(move || echo_through_guest(&uds, ECHO_PORT, &data))
        })
        .collect();
    for (i, e) in echoes.into_iter().enumerate() {
        if let Err(e) = e.join().unwrap() {
            clones[i]
                .vmm
                .fail(&format!("clone {i}: host to guest: {e}"));
        }
    }
    for (c, data) in clones.iter_mut().zip(&datas) {
        c.vmm.wait_for_within(&echoed_line(data), STEP_TIMEOUT);
    }
    // Guest to host from clone 0, after its echo.
    let c = &mut clones[0];
    held_connection_was_reset(&mut c.vmm);
    guest_to_host(&mut c.vmm, &c.uds, 20_000);
    // Each writes its own disk.
    for (i, c) in clones.iter_mut().enumerate() {
        c.vmm.type_line(&format!(
            "echo clone-$(({i} + 10)) > /clone.txt; sync; poweroff -f"
        ));
    }
    for (i, c) in clones.into_iter().enumerate() {
        let (seen, r) = c.vmm.finish(STEP_TIMEOUT);
        assert_eq!(r.code, Some(0), "clone {i}: {r}\n{seen}");
        // Each console shows its own echo only.
        let other = &datas[1 - i];
        assert!(
            !seen.contains(&echoed_line(other)),
            "clone {i} echoed the other clone's data:\n{seen}"
        );
        assert_eq!(
            file_in_image(&c.root, "/clone.txt"),
            format!("clone-{}", i + 10),
            "clone {i}'s disk copy"
        );
    }
    assert_eq!(
        file_in_image(&shared.root(), "/clone.txt"),
        "",
        "a clone wrote the snapshot's own disk"
    );
    eprintln!("took {:?}", started.elapsed());
}

// ------------------------------------------------------------------------------ network

/// A host peer (`HOST_PEER`) running in the namespace, its output streamed.
struct Peer {
    child: Option<Child>,
    out: Receiver<String>,
    seen: String,
}

impl Peer {
    fn start(ns: &NetNs, args: &[&str]) -> Peer {
        let mut child = ns
            .command("python3")
            .args(["-c", HOST_PEER])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start python3 in the test's network namespace");
        let out = stream_stdout(&mut child);
        let mut p = Peer {
            child: Some(child),
            out,
            seen: String::new(),
        };
        assert!(p.wait_for("LISTENING", STEP_TIMEOUT), "{}", p.end());
        p
    }

    fn wait_for(&mut self, what: &str, timeout: Duration) -> bool {
        wait_for_output(&self.out, &mut self.seen, what, timeout)
    }

    /// Waits (up to STEP_TIMEOUT) for the peer to end: its output, and stderr if it failed.
    fn end(&mut self) -> String {
        let Some(child) = self.child.take() else {
            return self.seen.clone();
        };
        let r = common::finish(child, STEP_TIMEOUT);
        while let Ok(chunk) = self.out.recv_timeout(Duration::from_millis(200)) {
            self.seen.push_str(&chunk);
        }
        if r.code != Some(0) {
            self.seen.push_str(&format!("[peer: {r}]"));
        }
        self.seen.clone()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn md5_hex(data: &[u8]) -> String {
    let mut c = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Random bytes in `dir/name`; their md5.
fn random_file(dir: &TempDir, name: &str, len: usize) -> (PathBuf, String) {
    let mut data = vec![0u8; len];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut data))
        .expect("read /dev/urandom");
    let p = dir.file(name, &data);
    (p, md5_hex(&data))
}

#[test]
fn emu_tcp_keeps_flowing_across_a_snapshot_restore_on_the_same_tap() {
    let test = "emu_tcp_keeps_flowing_across_a_snapshot_restore_on_the_same_tap";
    let started = Instant::now();
    let ns = match NetNs::for_test("fvsnapnet-") {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}");
            return;
        }
    };
    let tmp = TempDir::new("snapdev-net");
    let root = common::root_copy(&tmp);
    let (inflight, inflight_md5) = random_file(&tmp, "inflight.bin", 4 << 20);
    let (to_guest, to_guest_md5) = random_file(&tmp, "to-guest.bin", 3 << 20);

    let mut vmm = Vmm::start_in(
        &common::root_guest_args(&root, "256M", &["--net", &format!("tap={TAP}")]),
        &tmp.0.join("api.sock"),
        Some(&ns),
    );
    vmm.wait_for_within(ROOT_MARKER, BOOT_TIMEOUT);
    vmm.type_line(
        "ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; echo NET-UP=$((40 + 2))",
    );
    vmm.wait_for_within("NET-UP=42", STEP_TIMEOUT);

    // A small exchange before the snapshot.
    let mut small = Peer::start(&ns, &["recv", "5001"]);
    let hello = "hello-before-the-snapshot";
    vmm.type_line(&format!(
        "echo {hello} | tcp-xfer send {HOST_IP} 5001; echo SMALL-RC=$?"
    ));
    let rc = vmm.wait_for_value("SMALL-RC", STEP_TIMEOUT);
    assert_eq!(rc, "0", "tcp-xfer before the snapshot:\n{}", vmm.seen);
    let want = format!(
        "RECV {} {}",
        hello.len() + 1,
        md5_hex(format!("{hello}\n").as_bytes())
    );
    let got = small.end();
    assert!(
        got.contains(&want),
        "before the snapshot: {got}\n{}",
        vmm.seen
    );

    // A stream from the host that is flowing when the snapshot is taken.
    let mut slow = Peer::start(&ns, &["slowsend", "5002", inflight.to_str().unwrap()]);
    vmm.type_line(&format!(
        "(echo INFLIGHT-MD5=$(tcp-xfer recv {HOST_IP} 5002 | md5sum | cut -d' ' -f1)) &"
    ));
    if !slow.wait_for("PROGRESS", STEP_TIMEOUT) {
        vmm.fail(&format!(
            "the in-flight stream did not start: {}",
            slow.end()
        ));
    }
    let dir = tmp.0.join("snap");
    let before = vmm.snapshot_and_kill(&dir);
    assert_eq!(
        guest_value(&before, "INFLIGHT-MD5"),
        None,
        "the stream ended before the snapshot:\n{before}"
    );
    assert!(ns.has_tap(), "the tap went away with the VMM");

    // Restored on the same tap (named again, as a clone would name its own).
    let mut vmm = Vmm::start_in(
        &restore_args(&dir, &["--net".into(), format!("tap={TAP}")]),
        &tmp.0.join("api2.sock"),
        Some(&ns),
    );
    let got = vmm.wait_for_value("INFLIGHT-MD5", STEP_TIMEOUT);
    let slow_out = slow.end();
    assert_eq!(
        got, inflight_md5,
        "the stream in flight at the snapshot (host: {slow_out}):\n{}",
        vmm.seen
    );
    assert!(slow_out.contains("SENT"), "{slow_out}");

    // New streams of a few MiB each way.
    let mut recv = Peer::start(&ns, &["recv", "5003"]);
    vmm.type_line(&format!(
        "head -c {} /dev/urandom > /root/out.bin; echo OUT-MD5=$(md5sum < /root/out.bin | cut -d' ' -f1); \
         tcp-xfer send {HOST_IP} 5003 < /root/out.bin; echo SEND-RC=$?",
        3 << 20
    ));
    let out_md5 = vmm.wait_for_value("OUT-MD5", STEP_TIMEOUT);
    let rc = vmm.wait_for_value("SEND-RC", STEP_TIMEOUT);
    let recv_out = recv.end();
    assert_eq!(out_md5.len(), 32, "no md5 from the guest:\n{}", vmm.seen);
    assert!(
        recv_out.contains(&format!("RECV {} {out_md5}", 3 << 20)),
        "guest to host after the restore: host {recv_out}\n{}",
        vmm.seen
    );
    assert_eq!(rc, "0", "tcp-xfer send:\n{}", vmm.seen);

    let mut send = Peer::start(&ns, &["send", "5004", to_guest.to_str().unwrap()]);
    vmm.type_line(&format!(
        "echo GOT-MD5=$(tcp-xfer recv {HOST_IP} 5004 | md5sum | cut -d' ' -f1)"
    ));
    let got = vmm.wait_for_value("GOT-MD5", STEP_TIMEOUT);
    let send_out = send.end();
    assert_eq!(
        got, to_guest_md5,
        "host to guest after the restore (host: {send_out}):\n{}",
        vmm.seen
    );

    vmm.type_line("poweroff -f");
    let (seen, r) = vmm.finish(STEP_TIMEOUT);
    assert_eq!(r.code, Some(0), "{r}\n{seen}");
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn a_kernel_message_after_a_value_is_not_part_of_it() {
    // printk lands on the console wherever the guest's shell left off.
    let seen = "echo SMALL-RC=$?\r\nSMALL-RC=0[    5.695808] IPv6: eth0: link becomes ready\r\n";
    assert_eq!(guest_value(seen, "SMALL-RC").as_deref(), Some("0"));
    let seen = "MD5=[not a stamp] d41d8cd98f00b204e9800998ecf8427e\r\n";
    assert_eq!(
        guest_value(seen, "MD5").as_deref(),
        Some("[not a stamp] d41d8cd98f00b204e9800998ecf8427e")
    );
}
