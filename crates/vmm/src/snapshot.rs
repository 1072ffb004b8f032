//! The snapshot directory: a versioned, checksummed state file and a memory file.
//!
//! ```text
//! DIR/state    "FVSNAPST" | format version u32 LE | body length u64 LE | CRC-32 of body u32 LE
//!              | body: the JSON of a `Snapshot`
//! DIR/memory-N guest RAM, region after region at the offsets the state names; pages that are
//!              all zeros are holes (the file is sparse). N is unique per snapshot.
//! ```
//!
//! The header is checked before anything is parsed: a file of another format version, a
//! truncated file or a flipped bit is refused with a message saying which, and nothing starts.
//! The memory file is written first under its new name, then the state file under a temporary
//! name renamed over `state`, then older memory files are removed: a crash at any point leaves
//! a state file that matches its memory file. A VM restored from `DIR` (its memory a private
//! mapping of the old memory file) can be snapshotted into the same `DIR`: the old file's
//! pages stay mapped after its name is gone.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hypervisor::{BackendKind, SavedState};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// Version of the state file's layout and of `Snapshot`'s fields. A reader accepts only its
/// own version: the state of a VM cannot be partly understood.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"FVSNAPST";
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// Bounds what a corrupted length field can make the reader allocate.
const MAX_BODY_LEN: u64 = 256 << 20;
pub const STATE_FILE: &str = "state";
/// Memory files are named `memory-<unique suffix>`.
pub const MEMORY_FILE_PREFIX: &str = "memory-";
/// Compiled-code files are named `code-<unique suffix>`.
pub const CODE_FILE_PREFIX: &str = "code-";
const PAGE: usize = 4096;

/// Everything a snapshot holds besides guest memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// The Ferrovisor version that wrote it (informational).
    pub ferrovisor_version: String,
    /// Host wall-clock time when it was taken, ns since the Unix epoch: how far a restore
    /// that refreshes the guest clock moves it.
    pub created_unix_ns: u64,
    pub backend: BackendKind,
    /// The configuration the VM was built from (restore builds the same machine from it).
    pub config: VmConfig,
    pub memory: MemoryLayout,
    pub vm: SavedState,
    /// One per vCPU, by ID.
    pub vcpus: Vec<SavedState>,
    pub devices: DeviceStates,
    /// One per vCPU, by ID: the file in the directory that holds what the back end compiled
    /// for it (the emulator's blocks), which VMs restored from here map and share instead of
    /// each compiling its own; empty where there is none. Absent in older snapshots.
    #[serde(default)]
    pub code: Vec<String>,
}

/// Where each guest RAM region is in the memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryLayout {
    /// The memory file's name in the snapshot directory. Each snapshot gets a new name, so a
    /// state file never describes a memory file written by another snapshot.
    pub file: String,
    pub regions: Vec<RegionLayout>,
    /// The memory file's length: a file of another length is refused.
    pub file_len: u64,
    /// For a diff snapshot: the snapshot it builds on and which pages this one's memory file
    /// holds; `None` for a full snapshot, whose file holds every page.
    #[serde(default)]
    pub diff: Option<DiffMemory>,
}

/// What a diff snapshot's memory file holds: the pages written since its parent was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffMemory {
    /// The snapshot directory this one builds on (full or diff), as an absolute path.
    pub parent: PathBuf,
    /// Runs of pages in this snapshot's memory file, `(first page, count)` in file page
    /// numbers, sorted. Every other page is the parent's.
    pub runs: Vec<(u64, u64)>,
}

/// The longest chain of diff snapshots a restore follows (a guard against cycles).
pub const MAX_CHAIN: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionLayout {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

impl MemoryLayout {
    /// Regions packed one after another in the file `file`, in the order given.
    pub fn packed(file: String, regions: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut file_offset = 0;
        let regions = regions
            .into_iter()
            .map(|(guest_addr, len)| {
                let r = RegionLayout {
                    guest_addr,
                    len,
                    file_offset,
                };
                file_offset += len;
                r
            })
            .collect();
        MemoryLayout {
            file,
            regions,
            file_len: file_offset,
            diff: None,
        }
    }
}

/// The devices' states.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStates {
    pub serial: devices::legacy::serial::SerialState,
    pub rtc: devices::legacy::rtc::RtcState,
    pub i8042: devices::legacy::i8042::I8042State,
    /// The keyboard behind the i8042 (absent in the first snapshots of format 1: a keyboard
    /// just powered on).
    #[serde(default)]
    pub i8042_keyboard: devices::legacy::i8042::I8042KeyboardState,
    /// The PCI root bus (configuration address latch).
    pub pci: serde_json::Value,
    /// The virtio-pci functions in the order they were plugged in.
    pub virtio: Vec<serde_json::Value>,
}

/// What can go wrong reading or writing a snapshot. Every message names the file and what to
/// do.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what} {path:?}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0:?} is not a Ferrovisor snapshot state file (wrong magic bytes)")]
    NotASnapshot(PathBuf),
    #[error("{path:?} is snapshot format version {found}; this Ferrovisor reads version {FORMAT_VERSION} only (take the snapshot again with this version)")]
    Version { path: PathBuf, found: u32 },
    #[error("{path:?} is truncated: {what}; the snapshot is incomplete, take it again")]
    Truncated { path: PathBuf, what: String },
    #[error("{0:?} is corrupted (checksum mismatch); the snapshot cannot be used")]
    Checksum(PathBuf),
    #[error("{path:?} cannot be parsed: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("the memory file {path:?} is {found} bytes; the state file says {expected}; the snapshot is incomplete or from elsewhere")]
    MemorySize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("the snapshot was taken on the {found_lower} back end and can only be restored there, not on {expected:?} (use --backend {found_lower} or auto)")]
    Backend {
        expected: BackendKind,
        found: BackendKind,
        found_lower: &'static str,
    },
}

impl SnapshotError {
    pub fn io<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
        move |source| SnapshotError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

/// Writes `snapshot`'s state file into `dir` (created if missing).
pub fn write_state(dir: &Path, snapshot: &Snapshot) -> Result<(), SnapshotError> {
    fs::create_dir_all(dir).map_err(SnapshotError::io("create the directory", dir))?;
    let body = serde_json::to_vec(snapshot).map_err(|e| SnapshotError::Parse {
        path: dir.join(STATE_FILE),
        why: e.to_string(),
    })?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    write_atomically(&dir.join(STATE_FILE), |f| f.write_all(&bytes))
}

/// Removes the memory and code files in `dir` other than those `keep` names (left by earlier
/// snapshots).
pub fn remove_stale_files(dir: &Path, keep: &Snapshot) -> Result<(), SnapshotError> {
    let entries = fs::read_dir(dir).map_err(SnapshotError::io("list", dir))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name.starts_with(MEMORY_FILE_PREFIX) || name.starts_with(CODE_FILE_PREFIX);
        if ours && name != keep.memory.file && !keep.code.iter().any(|c| *c == name) {
            let path = entry.path();
            fs::remove_file(&path).map_err(SnapshotError::io("remove", &path))?;
        }
    }
    Ok(())
}

/// Reads and checks `dir`'s state file.
pub fn read_state(dir: &Path) -> Result<Snapshot, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let file = File::open(&path).map_err(SnapshotError::io("open", &path))?;
    // A header and the largest body one may announce, at most; the rest of a longer file is
    // never read. The buffer grows with what the file holds, not with what its header claims.
    let mut bytes = Vec::new();
    file.take(HEADER_LEN as u64 + MAX_BODY_LEN)
        .read_to_end(&mut bytes)
        .map_err(SnapshotError::io("read", &path))?;
    parse_state(&bytes, &path)
}

/// Checks and parses the bytes of a state file (`path` names it in errors): what
/// [`read_state`] does once it has read the file. Bytes after the body are ignored.
pub fn parse_state(bytes: &[u8], path: &Path) -> Result<Snapshot, SnapshotError> {
    let path = path.to_owned();
    let got = bytes.len();
    if got < MAGIC.len() || &bytes[..8] != MAGIC {
        return Err(if got < MAGIC.len() && MAGIC.starts_with(bytes) {
            SnapshotError::Truncated {
                path,
                what: format!("{got} bytes, not even a header"),
            }
        } else {
            SnapshotError::NotASnapshot(path)
        });
    }
    if got < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            path,
            what: format!("{got} bytes of a {HEADER_LEN}-byte header"),
        });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path,
            found: version,
        });
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    if len > MAX_BODY_LEN {
        return Err(SnapshotError::Parse {
            path,
            why: format!("the header claims a {len}-byte body"),
        });
    }
    let rest = &bytes[HEADER_LEN..];
    // Cannot truncate: bounded by MAX_BODY_LEN just above.
    let Some(body) = rest.get(..len as usize) else {
        return Err(SnapshotError::Truncated {
            path,
            what: format!("{} of {len} body bytes", rest.len()),
        });
    };
    if crc32fast::hash(body) != crc {
        return Err(SnapshotError::Checksum(path));
    }
    serde_json::from_slice(body).map_err(|e| SnapshotError::Parse {
        path,
        why: e.to_string(),
    })
}

/// Writes a file through a temporary name in the same directory, synced, then renamed over
/// `path`.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // Owner-only: the files hold all of the guest's memory and state (keys, passwords).
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(SnapshotError::io("create", &tmp))?;
    fill(&mut file).map_err(SnapshotError::io("write", &tmp))?;
    file.sync_all().map_err(SnapshotError::io("sync", &tmp))?;
    fs::rename(&tmp, path).map_err(SnapshotError::io("rename into place", path))?;
    Ok(())
}

/// Creates `dir`'s code file `name` (owner-only, empty) for a vCPU's compiled code. It is not
/// synced: a code file lost or torn in a crash is refused or checked away on restore, which
/// then compiles as it would without one.
pub fn create_code(dir: &Path, name: &str) -> Result<File, SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(SnapshotError::io("create", &path))
}

/// Opens `dir`'s code file `name` (as the state file names it) for a restore.
pub fn open_code(dir: &Path, name: &str) -> Result<(File, PathBuf), SnapshotError> {
    if name.contains('/') || !name.starts_with(CODE_FILE_PREFIX) {
        return Err(SnapshotError::Parse {
            path: dir.join(STATE_FILE),
            why: format!("{name:?} is not a code file name"),
        });
    }
    let path = dir.join(name);
    let file = File::open(&path).map_err(SnapshotError::io("open", &path))?;
    Ok((file, path))
}

/// One guest RAM region as the host sees it: `len` bytes at `host`.
#[derive(Clone, Copy, Debug)]
pub struct HostRegion {
    pub host: *const u8,
    pub len: usize,
    /// Private anonymous memory: a page the host never backed reads as zeros, so it need
    /// not be read at all (for a file mapping it would read as the file's bytes).
    pub anonymous: bool,
}

/// Writes guest memory into `dir`'s memory file as `layout` places it, leaving all-zero
/// pages as holes.
///
/// # Safety
/// Each region's `host .. host + len` must be readable, and nothing may write to it while
/// this runs (the vCPUs and the device threads are stopped).
pub unsafe fn write_memory(
    dir: &Path,
    layout: &MemoryLayout,
    regions: &[HostRegion],
) -> Result<(), SnapshotError> {
    fs::create_dir_all(dir).map_err(SnapshotError::io("create the directory", dir))?;
    let path = dir.join(&layout.file);
    write_atomically(&path, |file| {
        file.set_len(layout.file_len)?;
        for (r, host) in layout.regions.iter().zip(regions) {
            // SAFETY: the caller guarantees the range is readable and not written meanwhile.
            let bytes = unsafe { std::slice::from_raw_parts(host.host, host.len) };
            match host.anonymous.then(|| resident_pages(host)).flatten() {
                // Only the pages the guest touched: reading the others would make the host
                // back each one, for zeros.
                Some(resident) => {
                    for (first, count) in runs_of(&resident) {
                        let (lo, hi) = (first * PAGE, ((first + count) * PAGE).min(bytes.len()));
                        write_nonzero_pages(file, r.file_offset + lo as u64, &bytes[lo..hi])?;
                    }
                }
                None => write_nonzero_pages(file, r.file_offset, bytes)?,
            }
        }
        Ok(())
    })
}

/// Which pages of `region` the host has backed (`mincore`), one flag per page; `None` if it
/// cannot tell.
fn resident_pages(region: &HostRegion) -> Option<Vec<bool>> {
    if !(region.host as usize).is_multiple_of(PAGE) {
        return None;
    }
    let mut vec = vec![0u8; region.len.div_ceil(PAGE)];
    // SAFETY: the range is a mapping the caller vouches for (page-aligned, checked above);
    // mincore writes one byte per page into `vec`, which has room for all of them.
    let r = unsafe {
        libc::mincore(
            region.host as *mut libc::c_void,
            region.len,
            vec.as_mut_ptr(),
        )
    };
    (r == 0).then(|| vec.iter().map(|b| b & 1 == 1).collect())
}

/// `(first, count)` runs of the set flags.
fn runs_of(flags: &[bool]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, &f) in flags.iter().chain(std::iter::once(&false)).enumerate() {
        match (f, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                runs.push((s, i - s));
                start = None;
            }
            _ => {}
        }
    }
    runs
}

/// Writes the pages of guest memory that `runs` names (file page numbers, as in
/// [`DiffMemory::runs`]) into `dir`'s memory file, for a diff snapshot. Pages outside the
/// runs are holes, read from the parent on restore.
///
/// # Safety
/// As [`write_memory`].
pub unsafe fn write_memory_runs(
    dir: &Path,
    layout: &MemoryLayout,
    regions: &[HostRegion],
    runs: &[(u64, u64)],
) -> Result<(), SnapshotError> {
    fs::create_dir_all(dir).map_err(SnapshotError::io("create the directory", dir))?;
    let path = dir.join(&layout.file);
    write_atomically(&path, |file| {
        file.set_len(layout.file_len)?;
        for &(first, count) in runs {
            let (start, end) = (first * PAGE as u64, (first + count) * PAGE as u64);
            for (r, host) in layout.regions.iter().zip(regions) {
                let (lo, hi) = (start.max(r.file_offset), end.min(r.file_offset + r.len));
                if lo >= hi {
                    continue;
                }
                let at = (lo - r.file_offset) as usize;
                // SAFETY: `at..at + (hi - lo)` lies within the region, which the caller
                // guarantees readable and not written meanwhile.
                let bytes =
                    unsafe { std::slice::from_raw_parts(host.host.add(at), (hi - lo) as usize) };
                file.write_all_at(bytes, lo)?;
            }
        }
        Ok(())
    })
}

/// `(first, count)` runs of the set bits of per-region page bitmaps, as file page numbers of
/// `layout`.
pub fn dirty_runs(layout: &MemoryLayout, bitmaps: &[Vec<u64>]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (r, bits) in layout.regions.iter().zip(bitmaps) {
        let base = r.file_offset / PAGE as u64;
        let pages = r.len / PAGE as u64;
        for (w, word) in bits.iter().enumerate() {
            let mut word = *word;
            while word != 0 {
                let bit = u64::from(word.trailing_zeros());
                word &= word - 1;
                let page = w as u64 * 64 + bit;
                if page >= pages {
                    break;
                }
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == base + page => *count += 1,
                    _ => runs.push((base + page, 1)),
                }
            }
        }
    }
    runs
}

/// The snapshots a restore of `dir` reads memory from, base (full) first: `dir` itself when
/// it is full, else its chain of parents. Each must describe the same memory layout.
pub fn memory_chain(
    dir: &Path,
    snapshot: &Snapshot,
) -> Result<Vec<(PathBuf, MemoryLayout)>, SnapshotError> {
    let mut chain = vec![(dir.to_owned(), snapshot.memory.clone())];
    while let Some(diff) = chain.last().and_then(|(_, l)| l.diff.clone()) {
        if chain.len() > MAX_CHAIN {
            return Err(SnapshotError::Parse {
                path: dir.join(STATE_FILE),
                why: format!("its chain of diff snapshots is longer than {MAX_CHAIN} (a cycle?)"),
            });
        }
        let parent = read_state(&diff.parent)?;
        let (a, b) = (&parent.memory, &snapshot.memory);
        if a.regions.len() != b.regions.len()
            || a.file_len != b.file_len
            || a.regions.iter().zip(&b.regions).any(|(x, y)| {
                x.guest_addr != y.guest_addr || x.len != y.len || x.file_offset != y.file_offset
            })
        {
            return Err(SnapshotError::Parse {
                path: diff.parent.join(STATE_FILE),
                why: "its memory layout differs from the diff snapshot built on it".into(),
            });
        }
        chain.push((diff.parent.clone(), parent.memory));
    }
    chain.reverse();
    Ok(chain)
}

/// Writes the pages of `bytes` that are not all zeros at `offset..` of `file` (whose length is
/// already set, so the rest read as zeros), merging neighbouring pages into one write.
fn write_nonzero_pages(file: &File, offset: u64, bytes: &[u8]) -> io::Result<()> {
    let mut run_start: Option<usize> = None;
    let mut at = 0;
    while at < bytes.len() {
        let end = (at + PAGE).min(bytes.len());
        let zero = is_zero(&bytes[at..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(at),
            (true, Some(s)) => {
                file.write_all_at(&bytes[s..at], offset + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
        at = end;
    }
    if let Some(s) = run_start {
        file.write_all_at(&bytes[s..], offset + s as u64)?;
    }
    Ok(())
}

/// Whether every byte is zero, 16 at a time (which the compiler turns into vector compares;
/// byte by byte this check was most of a snapshot's time).
fn is_zero(bytes: &[u8]) -> bool {
    let chunks = bytes.chunks_exact(16);
    let rest = chunks.remainder();
    chunks
        .map(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")))
        .fold(0, |acc, w| acc | w)
        == 0
        && rest.iter().all(|&b| b == 0)
}

/// Opens `dir`'s memory file for a restore and checks its length against `layout`.
pub fn open_memory(dir: &Path, layout: &MemoryLayout) -> Result<File, SnapshotError> {
    if layout.file.contains('/') || !layout.file.starts_with(MEMORY_FILE_PREFIX) {
        return Err(SnapshotError::Parse {
            path: dir.join(STATE_FILE),
            why: format!("{:?} is not a memory file name", layout.file),
        });
    }
    let path = dir.join(&layout.file);
    let file = File::open(&path).map_err(SnapshotError::io("open", &path))?;
    let found = file
        .metadata()
        .map_err(SnapshotError::io("stat", &path))?
        .len();
    if found != layout.file_len {
        return Err(SnapshotError::MemorySize {
            path,
            expected: layout.file_len,
            found,
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let config = VmConfig::new(PathBuf::from("/k"));
        Snapshot {
            ferrovisor_version: "test".into(),
            created_unix_ns: 1,
            backend: BackendKind::Emu,
            config,
            memory: MemoryLayout::packed("memory-1".into(), [(0, 8192), (1 << 20, 4096)]),
            vm: SavedState {
                backend: BackendKind::Emu,
                state: serde_json::json!({"x": 1}),
            },
            vcpus: vec![],
            devices: DeviceStates {
                serial: Default::default(),
                rtc: devices::legacy::rtc::RtcState {
                    offset_ns: "0".into(),
                    index: 0,
                    cmos: vec![0; 128],
                },
                i8042: devices::legacy::i8042::I8042State {
                    control: 0,
                    output: None,
                    awaiting_ctr: false,
                },
                i8042_keyboard: Default::default(),
                pci: serde_json::Value::Null,
                virtio: vec![],
            },
            code: vec![],
        }
    }

    fn tempdir() -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fv-snap-test-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn state_round_trips_and_packs_regions() {
        let dir = tempdir();
        let s = sample();
        assert_eq!(s.memory.regions[1].file_offset, 8192);
        assert_eq!(s.memory.file_len, 12288);
        write_state(&dir, &s).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join(STATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "snapshots are owner-only");
        let back = read_state(&dir).unwrap();
        assert_eq!(back.memory, s.memory);
        assert_eq!(back.vm, s.vm);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_state_files_are_refused_with_what_is_wrong() {
        let dir = tempdir();
        write_state(&dir, &sample()).unwrap();
        let path = dir.join(STATE_FILE);
        let good = fs::read(&path).unwrap();
        let check = |bytes: &[u8], expect: &str| {
            fs::write(&path, bytes).unwrap();
            let err = read_state(&dir).unwrap_err().to_string();
            assert!(err.contains(expect), "{err:?} should contain {expect:?}");
        };
        check(&good[..good.len() - 1], "truncated");
        check(&good[..10], "truncated");
        check(&good[..3], "truncated");
        check(b"hello world, not a snapshot", "not a Ferrovisor snapshot");
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        check(&flipped, "checksum");
        let mut other_version = good.clone();
        other_version[8..12].copy_from_slice(&7u32.to_le_bytes());
        check(&other_version, "format version 7");
        let mut huge = good.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        check(&huge, "claims");
        fs::remove_file(&path).unwrap();
        assert!(read_state(&dir)
            .unwrap_err()
            .to_string()
            .contains("cannot open"));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_the_pages_an_anonymous_mapping_backs_are_read() {
        let len = 64 * PAGE;
        // SAFETY: a new private anonymous mapping, unmapped at the end of the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let mem = p.cast::<u8>();
        // SAFETY: offsets inside the mapping.
        unsafe {
            *mem.add(3 * PAGE + 1) = 5;
            *mem.add(40 * PAGE) = 6;
        }
        let region = HostRegion {
            host: mem,
            len,
            anonymous: true,
        };
        let resident = resident_pages(&region).unwrap();
        assert_eq!(runs_of(&resident), vec![(3, 1), (40, 1)]);
        let dir = tempdir();
        let layout = MemoryLayout::packed("memory-3".into(), [(0, len as u64)]);
        // SAFETY: the mapping is alive and not written during the call.
        unsafe { write_memory(&dir, &layout, &[region]) }.unwrap();
        let back = fs::read(dir.join("memory-3")).unwrap();
        assert_eq!((back[3 * PAGE + 1], back[40 * PAGE]), (5, 6));
        assert_eq!(back.iter().map(|&b| u32::from(b)).sum::<u32>(), 11);
        // SAFETY: unmaps the mapping made above; nothing uses it any more.
        unsafe { libc::munmap(p, len) };
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn memory_is_written_sparse_and_checked_for_size() {
        let dir = tempdir();
        let mut a = vec![0u8; 4 * PAGE];
        a[PAGE + 5] = 7;
        a[3 * PAGE] = 9;
        let b = vec![1u8; PAGE];
        let layout = MemoryLayout::packed(
            "memory-2".into(),
            [(0, a.len() as u64), (1 << 20, b.len() as u64)],
        );
        let regions = [
            HostRegion {
                host: a.as_ptr(),
                len: a.len(),
                anonymous: false,
            },
            HostRegion {
                host: b.as_ptr(),
                len: b.len(),
                anonymous: false,
            },
        ];
        // SAFETY: the vectors are alive and not written during the call.
        unsafe { write_memory(&dir, &layout, &regions) }.unwrap();
        let file = open_memory(&dir, &layout).unwrap();
        let mut back = vec![0u8; layout.file_len as usize];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[..a.len()], &a[..]);
        assert_eq!(&back[a.len()..], &b[..]);
        let wrong = MemoryLayout {
            file_len: layout.file_len + 1,
            ..layout.clone()
        };
        let err = open_memory(&dir, &wrong).unwrap_err().to_string();
        assert!(err.contains("bytes; the state file says"), "{err}");
        let evil = MemoryLayout {
            file: "../../etc/passwd".into(),
            ..layout.clone()
        };
        let err = open_memory(&dir, &evil).unwrap_err().to_string();
        assert!(err.contains("not a memory file name"), "{err}");
        fs::write(dir.join("memory-old"), b"x").unwrap();
        fs::write(dir.join("code-old-0"), b"x").unwrap();
        fs::write(dir.join("code-2-0"), b"x").unwrap();
        let mut keep = sample();
        keep.memory.file = "memory-2".into();
        keep.code = vec!["code-2-0".into()];
        remove_stale_files(&dir, &keep).unwrap();
        assert!(!dir.join("memory-old").exists());
        assert!(!dir.join("code-old-0").exists());
        assert!(dir.join("memory-2").exists());
        assert!(dir.join("code-2-0").exists());
        let err = open_code(&dir, "../memory-2").unwrap_err().to_string();
        assert!(err.contains("not a code file name"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }
}
