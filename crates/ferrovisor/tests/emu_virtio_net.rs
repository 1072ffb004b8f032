//! virtio-net with Debian's cloud kernel on the emulator back end: the test makes a network
//! namespace with a tap, runs the VMM in it, gives the guest an address, and moves 100 MiB
//! over TCP each way between a host program and the guest (`tcp-xfer` from the test root file
//! system), comparing checksums. Needs root (namespaces, taps) and iproute2; says SKIPPED
//! without them.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::netns::{NetNs, HOST_IP, HOST_PEER, TAP};
use common::*;

const ROOT_MARKER: &str = "FERROVISOR-ROOT-READY";
const TIMEOUT: Duration = Duration::from_secs(900);
const SIZE: usize = 100 << 20;

fn md5_of(path: &std::path::Path) -> String {
    let out = Command::new("md5sum").arg(path).output().expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_100_mib_tcp_transfer_each_way_over_tap_arrives_intact() {
    let ns = match NetNs::for_test("fvtest-") {
        Ok(ns) => ns,
        Err(e) => {
            println!("SKIPPED: {e}");
            return;
        }
    };
    let dir = TempDir::new("net");
    let root = root_copy(&dir);
    // Random data, so a misplaced or repeated chunk cannot pass the checksum.
    let data = dir.0.join("data.img");
    let made = Command::new("head")
        .args(["-c", &SIZE.to_string(), "/dev/urandom"])
        .stdout(std::fs::File::create(&data).unwrap())
        .status()
        .unwrap();
    assert!(made.success());
    let want = md5_of(&data);

    let receiver = ns.spawn(&["python3", "-c", HOST_PEER, "recv", "5001"]);
    let sender = ns.spawn(&[
        "python3",
        "-c",
        HOST_PEER,
        "send",
        "5002",
        data.to_str().unwrap(),
    ]);
    let data_disk = format!("path={},ro=on", data.display());
    let bin = env!("CARGO_BIN_EXE_ferrovisor");
    let args = root_guest_args(
        &root,
        "256M",
        &["--disk", &data_disk, "--net", &format!("tap={TAP}")],
    );
    let mut argv = vec![bin];
    argv.extend(args.iter().map(String::as_str));
    let mut vmm = ns.spawn(&argv);
    let rx = stream_stdout(&mut vmm);
    let mut seen = String::new();
    assert!(
        wait_for_output(&rx, &mut seen, ROOT_MARKER, TIMEOUT),
        "the guest never came up:\n{seen}"
    );
    let script = format!(
        "ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0\n\
         echo MAC=$(cat /sys/class/net/eth0/address)\n\
         tcp-xfer send {HOST_IP} 5001 </dev/vdb; echo SENT-RC=$?\n\
         echo GOT-MD5=$(tcp-xfer recv {HOST_IP} 5002 | md5sum | cut -d' ' -f1)\n\
         poweroff -f\n"
    );
    let mut stdin = vmm.stdin.take().unwrap();
    stdin.write_all(script.as_bytes()).unwrap();
    drop(stdin);
    let mut r = finish(vmm, TIMEOUT);
    seen.extend(rx.iter());
    r.stdout = seen;
    let recv = finish(receiver, Duration::from_secs(10));
    let sent = finish(sender, Duration::from_secs(10));
    assert_eq!(r.code, Some(0), "{r}");
    let value = |key: &str| console_value(&r.stdout, key).map(str::to_string);
    // The default MAC: 52:54:00 and bytes derived from the tap's name.
    assert!(
        value("MAC").is_some_and(|m| m.starts_with("52:54:00:")),
        "{r}"
    );
    assert_eq!(
        recv.stdout.lines().last(),
        Some(format!("RECV {SIZE} {want}").as_str()),
        "guest to host: {recv}\n{r}"
    );
    assert_eq!(value("SENT-RC").as_deref(), Some("0"), "{r}");
    assert_eq!(value("GOT-MD5"), Some(want), "host to guest ({sent}):\n{r}");
}

#[test]
fn bad_network_settings_fail_before_the_guest_starts_with_one_line() {
    let refused = |nets: &[&str], want: &str| {
        let r = run_refused("--net", nets);
        assert_eq!(r.code, Some(2), "{nets:?}: {r}");
        assert!(r.stderr.contains(want), "{nets:?} should say '{want}': {r}");
        // One line (clap adds a blank line and a pointer to --help after its own).
        let lines = r
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"))
            .count();
        assert_eq!(lines, 1, "one line: {r}");
        assert!(
            !r.stdout.contains("Linux version"),
            "the guest started: {r}"
        );
    };
    refused(&["tap=a-name-longer-than-15"], "longer than 15 bytes");
    refused(&["tap=t0", "tap=t0"], "given twice");
    refused(&["tap=t0,mac=52:54:00:zz:00:01"], "is not a MAC address");
    refused(&["tap=t0,mac=01:00:5e:00:00:01"], "multicast");
    refused(
        &[
            "tap=t0,mac=52:54:00:00:00:01",
            "tap=t1,mac=52:54:00:00:00:01",
        ],
        "given to two interfaces",
    );
    refused(&["mac=52:54:00:00:00:01"], "has no tap");
}
