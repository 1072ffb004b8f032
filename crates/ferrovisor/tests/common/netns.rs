//! A network namespace with a tap for the virtio-net tests: the VMM and the host end of the
//! guest's TCP streams run inside it, so the tests touch nothing on the host's own network.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The tap made in the namespace.
pub const TAP: &str = "fvtap0";
/// The tap's (the host's) address; the guest takes 10.0.2.15.
pub const HOST_IP: &str = "10.0.2.1";

/// The host end of a TCP stream with the guest, a Python program to run in the namespace
/// (`python3 -c HOST_PEER MODE PORT [FILE]`) on [`HOST_IP`]: `recv PORT` prints
/// "RECV <bytes> <md5>" after the peer closes; `send PORT FILE` sends the file, half-closes
/// and drains (closing with unread data would reset the connection and lose the tail);
/// `slowsend` does the same but prints PROGRESS after the first MiB and then paces the rest
/// (64 KiB every 50 ms), so the stream is still flowing when a test snapshots the VM. It
/// prints LISTENING once it listens and ACCEPTED once the guest has connected.
pub const HOST_PEER: &str = r#"
import hashlib, socket, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.0.2.1", port))
s.listen(1)
print("LISTENING", flush=True)
c, _ = s.accept()
print("ACCEPTED", flush=True)
if mode == "recv":
    h, n = hashlib.md5(), 0
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
    print("RECV", n, h.hexdigest(), flush=True)
else:
    step = 64 << 10 if mode == "slowsend" else 1 << 20
    sent = 0
    with open(sys.argv[3], "rb") as f:
        while True:
            b = f.read(step)
            if not b:
                break
            c.sendall(b)
            sent += len(b)
            if mode == "slowsend" and sent >= 1 << 20:
                if sent == 1 << 20:
                    print("PROGRESS", flush=True)
                time.sleep(0.05)
    c.shutdown(socket.SHUT_WR)
    while c.recv(1 << 16):
        pass
    print("SENT", flush=True)
c.close()
"#;

/// A network namespace with the tap [`TAP`] ([`HOST_IP`]/24), deleted with it on drop.
pub struct NetNs(String);

impl NetNs {
    /// A namespace `PREFIX<pid>` for this test process, after deleting the `PREFIX<pid>` ones
    /// left by runs that were killed (their guard never dropped); why not, as a SKIPPED reason:
    /// not root, or the namespace or tap cannot be made.
    pub fn for_test(prefix: &str) -> Result<NetNs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces and taps need root".into());
        }
        remove_stale(prefix);
        NetNs::create(&format!("{prefix}{}", std::process::id()))
            .map_err(|e| format!("cannot make a network namespace with a tap: {e}"))
    }

    /// Makes namespace `name` with the tap in it, up, and its loopback up.
    pub fn create(name: &str) -> Result<NetNs, String> {
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        ip(&["netns", "add", name])?;
        let ns = NetNs(name.to_string());
        ip(&[
            "-n", name, "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr",
        ])?;
        ip(&["-n", name, "addr", "add", "10.0.2.1/24", "dev", TAP])?;
        ip(&["-n", name, "link", "set", TAP, "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip netns exec NS PROGRAM`, to add the program's arguments to.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    /// `ip netns exec NS` + `args`, stdin, stdout and stderr piped.
    pub fn spawn(&self, args: &[&str]) -> Child {
        let (program, rest) = args.split_first().expect("a program to run");
        self.command(program)
            .args(rest)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a program in the test's network namespace")
    }

    /// Whether the tap is still there.
    pub fn has_tap(&self) -> bool {
        Command::new("ip")
            .args(["-n", &self.0, "link", "show", TAP])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Deletes the namespaces `PREFIX<pid>` whose process is gone.
fn remove_stale(prefix: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let pid = name
            .strip_prefix(prefix)
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}
