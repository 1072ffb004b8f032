//! Virtio devices with Debian's cloud kernel on the emulator back end. virtio-blk: the
//! initramfs loads the virtio modules and switches root into an ext4 image on /dev/vda; data
//! the guest writes to a disk is in the image file after power-off, and after a SIGKILL that
//! follows the guest's fsync; read-only disks refuse writes; bad disk arguments fail before
//! the guest starts. virtio-rng: the guest's hwrng is the virtio device and yields entropy.

mod common;

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const ROOT_MARKER: &str = "FERROVISOR-ROOT-READY";
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const PATTERN: &[u8] = b"FERROVISOR-PATTERN\n";

/// `n` bytes of the repeated pattern, as `yes FERROVISOR-PATTERN | head -c n` writes it.
fn pattern(n: usize) -> Vec<u8> {
    PATTERN.iter().copied().cycle().take(n).collect()
}

/// Starts the guest with root on `root`, the `disks` after it and an entropy device, a shell
/// on the console; returns the child and its output so far, once the root file system's
/// init is up.
fn boot_on_root(
    root: &Path,
    disks: &[String],
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    String,
) {
    let mut extra = vec!["--rng"];
    for d in disks {
        extra.extend_from_slice(&["--disk", d]);
    }
    let a = root_guest_args(root, "256M", &extra);
    let mut child = spawn(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let rx = stream_stdout(&mut child);
    let mut seen = String::new();
    let up = wait_for_output(&rx, &mut seen, ROOT_MARKER, BOOT_TIMEOUT);
    assert!(
        up,
        "the root file system on /dev/vda never came up:\n{seen}"
    );
    (child, rx, seen)
}

#[test]
fn the_guest_roots_on_virtio_blk_its_writes_reach_the_images_and_hwrng_is_virtio() {
    let dir = TempDir::new("blk");
    let root = root_copy(&dir);
    let data = dir.file("data.img", &vec![0u8; 8 << 20]);
    // Read-only disk with content the guest checksums.
    let ro_content: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let ro = dir.file("ro.img", &ro_content);
    let disks = [
        format!("path={},serial=data-b", data.display()),
        format!("path={},ro=on", ro.display()),
    ];
    let (mut child, rx, mut seen) = boot_on_root(&root, &disks);
    let script = "echo ROOT=$(grep ' / ' /proc/mounts | cut -d' ' -f1,3)\n\
         echo SERIAL=$(cat /sys/block/vdb/serial)\n\
         echo RO-FLAG=$(cat /sys/block/vdc/ro)\n\
         echo RO-MD5=$(md5sum </dev/vdc | cut -d' ' -f1)\n\
         yes FERROVISOR-PATTERN | head -c 1000000 >/dev/vdb; sync\n\
         echo VDB-MD5=$(head -c 1000000 /dev/vdb | md5sum | cut -d' ' -f1)\n\
         dd if=/dev/zero of=/dev/vdc bs=512 count=1 2>/dev/null; echo RO-WRITE=$?\n\
         echo persisted-on-root >/root/note; sync\n\
         echo RNG=$(cat /sys/class/misc/hw_random/rng_current)\n\
         echo RNG-A=$(head -c 4096 /dev/hwrng | md5sum | cut -d' ' -f1)\n\
         echo RNG-B=$(head -c 4096 /dev/hwrng | md5sum | cut -d' ' -f1)\n\
         poweroff -f\n";
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(script.as_bytes()).unwrap();
    drop(stdin);
    let mut r = finish(child, BOOT_TIMEOUT);
    seen.extend(rx.iter());
    r.stdout = seen;
    assert_eq!(r.code, Some(0), "{r}");
    let out = r.stdout.as_str();
    assert_eq!(console_value(out, "ROOT"), Some("/dev/vda ext4"), "{r}");
    assert_eq!(console_value(out, "SERIAL"), Some("data-b"), "{r}");
    assert_eq!(console_value(out, "RO-FLAG"), Some("1"), "{r}");
    let ro_md5 = md5_of(&ro);
    assert_eq!(
        console_value(out, "RO-MD5"),
        Some(ro_md5.as_str()),
        "reads of vdc: {r}"
    );
    assert_ne!(
        console_value(out, "RO-WRITE"),
        Some("0"),
        "a write to the read-only disk succeeded: {r}"
    );
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        ro_content,
        "the read-only image changed"
    );

    assert_eq!(console_value(out, "RNG"), Some("virtio_rng.0"), "{r}");
    let (a, b) = (console_value(out, "RNG-A"), console_value(out, "RNG-B"));
    assert!(
        a.is_some_and(|a| a.len() == 32) && a != b,
        "two reads of /dev/hwrng must give different data: {r}"
    );

    let written = std::fs::read(&data).unwrap();
    assert_eq!(written.len(), 8 << 20, "the image changed size");
    assert!(
        written[..1_000_000] == pattern(1_000_000)[..],
        "the pattern the guest wrote to /dev/vdb is not in the image"
    );
    assert!(
        written[1_000_000..].iter().all(|&b| b == 0),
        "bytes past the write changed"
    );
    let host_md5 = md5_bytes(&written[..1_000_000]);
    assert_eq!(
        console_value(out, "VDB-MD5"),
        Some(host_md5.as_str()),
        "{r}"
    );

    // The file written on the ext4 root is in the image (debugfs reads it without mounting).
    let note = Command::new("debugfs")
        .args(["-R", "cat /root/note"])
        .arg(&root)
        .output();
    match note {
        Ok(o) => assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            "persisted-on-root",
            "debugfs: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("debugfs (e2fsprogs) is needed for this test: {e}"),
    }
}

#[test]
fn data_the_guest_fsynced_survives_a_sigkill_of_the_vmm() {
    let dir = TempDir::new("blk-kill");
    let root = root_copy(&dir);
    let data = dir.file("data.img", &vec![0u8; 4 << 20]);
    let disks = [format!("path={}", data.display())];
    let (mut child, rx, mut seen) = boot_on_root(&root, &disks);
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(
            b"yes FERROVISOR-PATTERN | head -c 1048576 | dd of=/dev/vdb bs=64k conv=fsync 2>/dev/null && echo FSYNC-RETURNED\n",
        )
        .unwrap();
    let done = wait_for_output(&rx, &mut seen, "\nFSYNC-RETURNED", BOOT_TIMEOUT);
    assert!(done, "the guest's write never returned:\n{seen}");
    child.kill().expect("SIGKILL the VMM");
    let _ = child.wait();
    let written = std::fs::read(&data).unwrap();
    assert!(
        written[..1 << 20] == pattern(1 << 20)[..],
        "data the guest fsynced is not in the image after SIGKILL"
    );
}

fn md5_bytes(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run md5sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn md5_of(path: &Path) -> String {
    md5_bytes(&std::fs::read(path).unwrap())
}

#[test]
fn bad_disks_fail_before_the_guest_starts_with_one_line() {
    let dir = TempDir::new("blk-bad");
    let missing = dir.0.join("missing.img");
    let r = run_refused("--disk", &[format!("path={}", missing.display())]);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("cannot open disk image"), "{r}");
    assert!(r.stderr.contains("missing.img"), "{r}");
    assert!(
        !r.stdout.contains("Linux version"),
        "the guest started: {r}"
    );

    let img = dir.file("a.img", &[0u8; 4096]);
    let r = run_refused(
        "--disk",
        &[
            format!("path={}", img.display()),
            format!("path={},ro=on", img.display()),
        ],
    );
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("given twice"), "{r}");

    let r = run_refused("--disk", &[format!("path={},bogus=1", img.display())]);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("unknown disk option 'bogus'"), "{r}");

    // Another VM (here: this test) holds the image: a second writer is refused.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    // SAFETY: flock on a descriptor this test owns.
    let locked = unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(locked, 0);
    let r = run_refused("--disk", &[format!("path={}", img.display())]);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("in use by another VM"), "{r}");
    assert_eq!(
        r.stderr.trim().lines().count(),
        1,
        "one line, not a trace: {r}"
    );
    drop(held);
}

#[test]
fn deterministic_boots_with_root_on_virtio_blk_print_identical_consoles() {
    // In deterministic mode the disk's requests are served, and their interrupts raised, at
    // the notifying instruction, so disk I/O does not make two runs differ. Each run gets a
    // fresh copy of the root image: mounting it read-write changes it.
    let run_once = |tag: &str| {
        let dir = TempDir::new(tag);
        let root = root_copy(&dir);
        let mut args = root_guest_args(&root, "256M", &["--deterministic"]);
        // Not a shell: the root's init prints its marker and powers off by itself.
        let cmdline = args.iter().position(|a| a == "--cmdline").unwrap() + 1;
        args[cmdline] = "console=ttyS0 panic=-1 ferrovisor.root=/dev/vda".into();
        run(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            b"",
            BOOT_TIMEOUT,
        )
    };
    let (a, b) = (run_once("det-a"), run_once("det-b"));
    assert_eq!(a.code, Some(0), "{a}");
    assert!(a.stdout.contains(ROOT_MARKER), "{a}");
    assert!(a.stdout.contains("EXT4-fs (vda)"), "{a}");
    assert_eq!(b.code, Some(0), "{b}");
    // Kernel log timestamps included.
    assert_eq!(a.stdout, b.stdout, "the two deterministic boots differ");
}
