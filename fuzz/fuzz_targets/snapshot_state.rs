//! The snapshot state file reader (`vmm::snapshot::parse_state`, the whole of `read_state`
//! once the file is read) on arbitrary bytes: a snapshot directory may come from anyone.
//!
//! Layout (`crates/vmm/src/snapshot.rs`): "FVSNAPST" | format version u32 LE | body length
//! u64 LE | CRC-32 of the body u32 LE | body: the JSON of a `Snapshot`.
//!
//! Input: byte 0 picks fix-ups, the rest is the file. Bit 1: the length field is set to the
//! number of bytes after the 24-byte header. Bit 0: the CRC field is set to the checksum of
//! the body the length field names (or of what there is of it). With both (byte 0 = 3) every
//! input reaches the JSON parser, so the body is what gets fuzzed.
//!
//! Reference (written here from the layout): fewer than 8 bytes that start the magic are
//! "truncated", other bytes without the magic "not a snapshot"; fewer than 24 bytes
//! "truncated"; another version is refused naming it; a length over 256 MiB is refused
//! before anything is read or allocated; fewer body bytes than the length "truncated"; a
//! wrong CRC "checksum"; then the body (and only the body: later bytes are ignored) is the
//! JSON of a `Snapshot`.
//!
//! Checks: nothing panics; the outcome is the reference's; every error message names the
//! file; parsing never has more than 64 times the input (plus 64 KiB) allocated at once, so
//! no length field drives an allocation; an accepted state written back with `write_state`
//! and read with `read_state` (on tmpfs) gives an equal `Snapshot` (compared as JSON
//! values, floats in its opaque JSON exactly: serde_json's `float_roundtrip`).
//!
//! `SNAPSHOT_FUZZ_TRACE=1` prints each input's outcome.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrovisor_fuzz::alloc_count::{measure, CountingAlloc};
use libfuzzer_sys::fuzz_target;
use vmm::snapshot::{
    parse_state, read_state, write_state, Snapshot, SnapshotError, FORMAT_VERSION,
};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const MAGIC: &[u8; 8] = b"FVSNAPST";
const HEADER_LEN: usize = 24;
/// The longest body a header may announce (`MAX_BODY_LEN` in snapshot.rs).
const MAX_BODY_LEN: u64 = 256 << 20;
const PATH: &str = "/fuzz/DIR/state";

/// What the reader must make of the bytes.
#[derive(Debug)]
enum Want<'a> {
    Truncated,
    NotASnapshot,
    Version(u32),
    TooLong,
    Checksum,
    /// The header is right: the body parses or not.
    Body(&'a [u8]),
}

fn reference(b: &[u8]) -> Want<'_> {
    if b.len() < MAGIC.len() {
        return if MAGIC.starts_with(b) {
            Want::Truncated
        } else {
            Want::NotASnapshot
        };
    }
    if &b[..8] != MAGIC {
        return Want::NotASnapshot;
    }
    if b.len() < HEADER_LEN {
        return Want::Truncated;
    }
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Want::Version(version);
    }
    let len = u64::from(u32_at(12)) | u64::from(u32_at(16)) << 32;
    if len > MAX_BODY_LEN {
        return Want::TooLong;
    }
    let body = &b[HEADER_LEN..];
    if (body.len() as u64) < len {
        return Want::Truncated;
    }
    let body = &body[..len as usize];
    if crc32fast::hash(body) != u32_at(20) {
        return Want::Checksum;
    }
    Want::Body(body)
}

fn fix_up(mode: u8, file: &mut [u8]) {
    if file.len() < HEADER_LEN {
        return;
    }
    if mode & 2 != 0 {
        let n = (file.len() - HEADER_LEN) as u64;
        file[12..20].copy_from_slice(&n.to_le_bytes());
    }
    if mode & 1 != 0 {
        let len = u64::from_le_bytes(file[12..20].try_into().expect("8 bytes"));
        let end = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .saturating_add(HEADER_LEN)
            .min(file.len());
        let crc = crc32fast::hash(&file[HEADER_LEN..end]);
        file[20..24].copy_from_slice(&crc.to_le_bytes());
    }
}

/// A directory on tmpfs (else the temporary directory) for the round trip, removed at exit.
fn scratch_dir() -> &'static Path {
    const PREFIX: &str = "ferrovisor-fuzz-snapshot-";
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    extern "C" fn remove() {
        if let Some(d) = DIR.get() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        // Those of runs that ended without exit handlers (a crash), first.
        for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix(PREFIX));
            if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let d = base.join(format!("{PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the scratch directory");
        // SAFETY: registers a plain function with no arguments to run at exit.
        unsafe { libc::atexit(remove) };
        d
    })
}

fn value(s: &Snapshot) -> serde_json::Value {
    serde_json::to_value(s).expect("a snapshot encodes")
}

fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(2000)]).into_owned();
    format!("{s:?} ({} bytes)", b.len())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut file = rest.to_vec();
    fix_up(mode, &mut file);
    let path = Path::new(PATH);

    let (got, peak) = measure(|| parse_state(&file, path));
    let limit = 64 * file.len() + (64 << 10);
    assert!(
        peak <= limit,
        "parsing {} bytes had {peak} bytes allocated at once (limit {limit})",
        file.len()
    );

    let want = reference(&file);
    if std::env::var_os("SNAPSHOT_FUZZ_TRACE").is_some() {
        match &got {
            Ok(_) => eprintln!("snapshot_state: {} bytes: accepted", file.len()),
            Err(e) => eprintln!("snapshot_state: {} bytes: {e}", file.len()),
        }
    }
    let snapshot = match (got, want) {
        (Ok(s), Want::Body(body)) => {
            let direct: Snapshot = serde_json::from_slice(body)
                .unwrap_or_else(|e| panic!("accepted a body serde_json refuses: {e}"));
            assert!(value(&s) == value(&direct));
            s
        }
        (Err(e), want) => {
            let msg = e.to_string();
            assert!(
                msg.contains(PATH),
                "the message does not name the file: {msg}"
            );
            match (&e, &want) {
                (SnapshotError::Truncated { .. }, Want::Truncated)
                | (SnapshotError::NotASnapshot(_), Want::NotASnapshot)
                | (SnapshotError::Checksum(_), Want::Checksum) => {}
                (SnapshotError::Version { found, .. }, Want::Version(v)) if found == v => {}
                (SnapshotError::Parse { why, .. }, Want::TooLong) if why.contains("claims") => {}
                (SnapshotError::Parse { .. }, Want::Body(body)) => {
                    assert!(
                        serde_json::from_slice::<Snapshot>(body).is_err(),
                        "refused a body serde_json accepts: {msg}"
                    );
                }
                _ => panic!("got {msg:?}, expected {want:?}; file {}", show(&file)),
            }
            return;
        }
        (Ok(_), want) => panic!(
            "accepted a file the reference refuses ({want:?}): {}",
            show(&file)
        ),
    };

    // Written back as write_state writes it, read as read_state reads it: the same snapshot.
    let dir = scratch_dir();
    write_state(dir, &snapshot).unwrap_or_else(|e| panic!("write_state: {e}"));
    let again = read_state(dir).unwrap_or_else(|e| {
        let written = std::fs::read(dir.join(vmm::snapshot::STATE_FILE)).unwrap_or_default();
        panic!(
            "the state written back does not read: {e}; it is {}",
            show(&written)
        )
    });
    let (a, b) = (value(&snapshot), value(&again));
    assert!(a == b, "round trip changed the snapshot:\n{a}\n{b}");
});
