//! virtio-balloon (virtio 1.2, 5.5): the host asks the guest to give memory back.
//!
//! The host sets a target (`num_pages`, in 4 KiB pages) in the configuration space and raises
//! a configuration-change interrupt; the driver allocates that many pages inside the guest and
//! lists their frame numbers on the inflate queue, and the device discards the host memory
//! behind each one (`madvise(MADV_DONTNEED)`: guest RAM is private anonymous memory, so the
//! pages go back to the host and read as zeros if touched again). When the target drops, the
//! driver lists the pages it takes back on the deflate queue; nothing needs doing for them.
//! The driver reports how many pages it holds in `actual`.
//!
//! Queues: inflate (0), deflate (1) and, with `STATS_VQ`, statistics (2). The driver posts one
//! statistics buffer of `(le16 tag, le64 value)` entries; the device reads it and keeps it.
//! To ask for fresh values the device returns the buffer (used, length 0); the driver fills
//! it again and re-posts it.
//!
//! Host control: a [`BalloonHandle`] changes the target and fetches statistics from any
//! thread; the device learns about it through an `EventFd` that the VMM's event loop watches
//! (the device's one back-end descriptor), so the configuration-change interrupt and the
//! statistics request leave from the event loop. An optional unix socket
//! ([`Balloon::new`]'s `control`) serves a line protocol on a thread of its own:
//! `set SIZE` changes the target, `stats` prints the latest values as `key=value` lines; every
//! reply ends with a line `ok` or `error: ...`.
//!
//! Guest input checked here: frame numbers outside guest RAM (counted in
//! [`BalloonCounters::invalid_pfns`] and skipped), buffers of the wrong kind or too large
//! (counted, read only up to [`MAX_PFNS_PER_BUFFER`] frames), statistics with unknown tags or
//! a partial entry (ignored), and writes to the configuration space other than `actual`.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hypervisor::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::state::{decode, encode, same};
use crate::{
    device_type, features, ActivateError, Activation, ActiveQueue, QueuePosition, StateError,
    VirtioDevice,
};

/// Feature bits of the balloon (virtio 1.2, 5.5.3).
pub mod feature {
    /// The driver must tell the host before it uses deflated pages (not offered).
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    /// The statistics queue is present.
    pub const STATS_VQ: u64 = 1 << 1;
    /// The driver deflates the balloon when the guest runs out of memory.
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
}

/// The balloon's page size: frame numbers count 4 KiB pages whatever the guest's page size.
pub const PAGE_SIZE: u64 = 4096;
const PAGE_SHIFT: u32 = 12;
const QUEUE_SIZE: u16 = 64;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;
/// Frame numbers read from one buffer at most (Linux sends 256); the rest of a larger buffer
/// is ignored, so one notification cannot keep the event loop busy for long.
pub const MAX_PFNS_PER_BUFFER: usize = 4096;
/// Bytes read from a statistics buffer at most (Linux sends 10 entries of 10 bytes).
const MAX_STATS_BYTES: usize = 1024;
/// Size of one statistics entry: le16 tag, le64 value, packed.
const STAT_ENTRY_LEN: usize = 10;
/// How long [`BalloonHandle::request_stats`] waits for the guest by default.
pub const STATS_TIMEOUT: Duration = Duration::from_secs(5);

/// The statistics the device knows (virtio 1.2, 5.5.6.3), by tag, with the names the control
/// socket prints. Memory amounts are bytes; faults are counts.
pub const STAT_NAMES: [&str; 10] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
];

/// The latest value of each statistic the guest reported (`None`: never reported).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    pub values: [Option<u64>; STAT_NAMES.len()],
}

impl BalloonStats {
    /// The value of the statistic named `name` (one of [`STAT_NAMES`]).
    pub fn get(&self, name: &str) -> Option<u64> {
        let i = STAT_NAMES.iter().position(|&n| n == name)?;
        self.values[i]
    }
}

/// What a statistics buffer held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ParsedStats {
    /// Entries with a known tag.
    pub known: usize,
    /// Entries with a tag this device does not know (newer drivers add some): ignored.
    pub unknown: usize,
    /// Bytes after the last whole entry: ignored.
    pub trailing: usize,
}

/// Applies the `(le16 tag, le64 value)` entries of `buf` to `stats`; a later entry with the
/// same tag wins.
pub fn parse_stats(buf: &[u8], stats: &mut BalloonStats) -> ParsedStats {
    let mut parsed = ParsedStats {
        trailing: buf.len() % STAT_ENTRY_LEN,
        ..ParsedStats::default()
    };
    for entry in buf.chunks_exact(STAT_ENTRY_LEN) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let mut value = [0u8; 8];
        value.copy_from_slice(&entry[2..]);
        match stats.values.get_mut(usize::from(tag)) {
            Some(slot) => {
                *slot = Some(u64::from_le_bytes(value));
                parsed.known += 1;
            }
            None => parsed.unknown += 1,
        }
    }
    parsed
}

/// The le32 frame numbers in `buf`; bytes after the last whole one are ignored.
pub fn parse_pfns(buf: &[u8]) -> impl Iterator<Item = u32> + '_ {
    buf.chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Runs of consecutive frame numbers, `(first, count)`, in the order given: `[5, 6, 7, 2]`
/// is `[(5, 3), (2, 1)]`.
pub fn pfn_runs(pfns: impl IntoIterator<Item = u32>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for pfn in pfns {
        let pfn = u64::from(pfn);
        match runs.last_mut() {
            Some((first, count)) if *first + *count == pfn => *count += 1,
            _ => runs.push((pfn, 1)),
        }
    }
    runs
}

/// Parses a size as `--memory` takes it: `512M`, `2G`, `1048576K`, `0`; a bare number is MiB.
/// It must be a multiple of 4 KiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let bad = || format!("'{s}' is not a size; write e.g. 512M or 1G");
    let value: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    let bytes = value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))?;
    if !bytes.is_multiple_of(PAGE_SIZE) {
        return Err(format!("size '{s}' is not a multiple of 4 KiB"));
    }
    Ok(bytes)
}

/// A line of the control protocol.
#[derive(Debug, PartialEq, Eq)]
pub enum ControlCommand {
    /// `set SIZE`: the new target, in bytes.
    Set(u64),
    /// `stats`: fresh statistics, the target, `actual` and the counters.
    Stats,
}

/// Parses one line of the control protocol (without its newline).
pub fn parse_command(line: &str) -> Result<ControlCommand, String> {
    let mut words = line.split_whitespace();
    let cmd = match (words.next(), words.next()) {
        (Some("set"), Some(size)) => ControlCommand::Set(parse_size(size)?),
        (Some("stats"), None) => return Ok(ControlCommand::Stats),
        (Some("set"), None) => return Err("set needs a size, e.g. set 512M".into()),
        _ => return Err(format!("unknown command '{line}'; use set SIZE or stats")),
    };
    if words.next().is_some() {
        return Err(format!("too many words in '{line}'"));
    }
    Ok(cmd)
}

/// What happened on the device.
#[derive(Debug, Default)]
pub struct BalloonCounters {
    /// Pages discarded for the inflate queue.
    pub inflated_pages: AtomicU64,
    /// Pages the guest took back through the deflate queue.
    pub deflated_pages: AtomicU64,
    /// Frame numbers outside guest RAM, on either queue: skipped.
    pub invalid_pfns: AtomicU64,
    /// Buffers that could not be read (device-writable, outside guest memory) or held more
    /// than [`MAX_PFNS_PER_BUFFER`] frames or a partial one.
    pub bad_buffers: AtomicU64,
    /// `madvise` calls that failed (the memory stays with the guest's process).
    pub discard_errors: AtomicU64,
    /// Statistics buffers received.
    pub stats_updates: AtomicU64,
}

/// What the statistics waiters watch.
#[derive(Default)]
struct StatsState {
    stats: BalloonStats,
    /// Bumped for every statistics buffer received.
    generation: u64,
    /// Bumped when a request cannot reach the guest (no driver, no statistics queue).
    declined: u64,
}

/// State shared by the device, its handles and the control thread.
struct Shared {
    /// Guest RAM in bytes: the largest target.
    memory_bytes: u64,
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    counters: BalloonCounters,
    stats: Mutex<StatsState>,
    stats_changed: Condvar,
    /// The host asked for fresh statistics.
    stats_wanted: AtomicBool,
    /// Wakes the device on the event loop (its back-end descriptor).
    wake: EventFd,
}

impl Shared {
    fn stats_lock(&self) -> std::sync::MutexGuard<'_, StatsState> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Controls a balloon from the host, from any thread.
#[derive(Clone)]
pub struct BalloonHandle(Arc<Shared>);

impl BalloonHandle {
    /// Sets the target to `bytes` (rounded down to 4 KiB pages) and tells the driver.
    pub fn set_target(&self, bytes: u64) -> Result<(), String> {
        if bytes > self.0.memory_bytes {
            return Err(format!(
                "the balloon target {} MiB exceeds guest memory ({} MiB)",
                bytes >> 20,
                self.0.memory_bytes >> 20
            ));
        }
        let pages = u32::try_from(bytes >> PAGE_SHIFT)
            .map_err(|_| "the balloon target is too large".to_string())?;
        self.0.target_pages.store(pages, Ordering::Release);
        let _ = self.0.wake.write(1);
        Ok(())
    }

    /// The target, in bytes.
    pub fn target_bytes(&self) -> u64 {
        u64::from(self.0.target_pages.load(Ordering::Acquire)) << PAGE_SHIFT
    }

    /// What the driver says the balloon holds, in bytes.
    pub fn actual_bytes(&self) -> u64 {
        u64::from(self.0.actual_pages.load(Ordering::Acquire)) << PAGE_SHIFT
    }

    pub fn counters(&self) -> &BalloonCounters {
        &self.0.counters
    }

    /// The statistics last received, without asking the guest.
    pub fn latest_stats(&self) -> BalloonStats {
        self.0.stats_lock().stats
    }

    /// Asks the guest for fresh statistics and waits up to `timeout` for them; returns the
    /// latest values and whether they are fresh (false: the guest did not answer in time, or
    /// has no driver or no statistics queue).
    pub fn request_stats(&self, timeout: Duration) -> (BalloonStats, bool) {
        let deadline = Instant::now() + timeout;
        let mut st = self.0.stats_lock();
        let (generation, declined) = (st.generation, st.declined);
        self.0.stats_wanted.store(true, Ordering::Release);
        let _ = self.0.wake.write(1);
        loop {
            if st.generation != generation {
                return (st.stats, true);
            }
            let now = Instant::now();
            if st.declined != declined || now >= deadline {
                return (st.stats, false);
            }
            st = self
                .0
                .stats_changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Why the balloon could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("the directory of the balloon control socket {0} does not exist")]
    NoDirectory(PathBuf),
    #[error("balloon control socket {0} is in use (a process listens on it); stop it or choose another path")]
    InUse(PathBuf),
    #[error("balloon control socket path {0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    #[error("cannot listen on balloon control socket {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the balloon device")]
    Setup(#[source] io::Error),
}

impl BalloonError {
    /// Whether the user can fix it (a path), as opposed to a failure of the host.
    pub fn is_usage_error(&self) -> bool {
        !matches!(self, BalloonError::Setup(_))
    }
}

/// The queues the driver set up.
struct Active {
    inflate: ActiveQueue,
    deflate: ActiveQueue,
    stats: Option<ActiveQueue>,
    /// Head of the statistics buffer the device holds, returned to ask for fresh values.
    held_stats: Option<u16>,
    /// The target the driver last heard of.
    notified_target: u32,
}

/// The balloon's state for a snapshot. The pages it holds are guest memory, saved with it
/// (as zeros, for discarded ones).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonState {
    /// Guest RAM; the restored device must have the same.
    memory_bytes: u64,
    /// The host's target, as it stood (set at run time, so not necessarily the configured
    /// size).
    target_pages: u32,
    /// What the driver last wrote to `actual`.
    actual_pages: u32,
    /// The latest statistics, by tag.
    stats: Vec<Option<u64>>,
    /// While running: the statistics buffer the device holds (returned to ask for fresh
    /// values) and the target the driver last heard of.
    held_stats: Option<u16>,
    notified_target: Option<u32>,
}

/// What a restore hands to the next activation.
#[derive(Clone, Copy, Debug)]
struct Resumed {
    held_stats: Option<u16>,
    notified_target: u32,
}

pub struct Balloon {
    offered: u64,
    shared: Arc<Shared>,
    active: Option<Active>,
    /// Set by a restore, for the activation that follows it.
    resumed: Option<Resumed>,
    _control: Option<ControlServer>,
}

impl Balloon {
    /// A balloon for a guest with `memory_bytes` of RAM, with an initial target of
    /// `target_bytes`; `deflate_on_oom` offers `DEFLATE_ON_OOM`; `control` is a unix socket
    /// path to serve the control protocol on.
    pub fn new(
        memory_bytes: u64,
        target_bytes: u64,
        deflate_on_oom: bool,
        control: Option<&Path>,
    ) -> Result<Balloon, BalloonError> {
        let shared = Arc::new(Shared {
            memory_bytes,
            target_pages: AtomicU32::new(0),
            actual_pages: AtomicU32::new(0),
            counters: BalloonCounters::default(),
            stats: Mutex::new(StatsState::default()),
            stats_changed: Condvar::new(),
            stats_wanted: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(BalloonError::Setup)?,
        });
        let handle = BalloonHandle(shared.clone());
        handle
            .set_target(target_bytes)
            .map_err(|e| BalloonError::Setup(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let control = control
            .map(|path| ControlServer::start(path, handle))
            .transpose()?;
        let mut offered = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | feature::STATS_VQ;
        if deflate_on_oom {
            offered |= feature::DEFLATE_ON_OOM;
        }
        Ok(Balloon {
            offered,
            shared,
            active: None,
            resumed: None,
            _control: control,
        })
    }

    /// A handle to change the target and read statistics while the guest runs.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle(self.shared.clone())
    }

    /// The event loop woke the device: tell the driver about a new target, return the
    /// statistics buffer if the host wants fresh values.
    fn host_request(&mut self) {
        let _ = self.shared.wake.read();
        let wanted = self.shared.stats_wanted.swap(false, Ordering::AcqRel);
        let Some(a) = self.active.as_mut() else {
            if wanted {
                decline_stats(&self.shared);
            }
            return;
        };
        let target = self.shared.target_pages.load(Ordering::Acquire);
        if target != a.notified_target {
            a.notified_target = target;
            a.inflate.interrupt.notify_config();
        }
        if !wanted {
            return;
        }
        let Some(q) = a.stats.as_mut() else {
            return decline_stats(&self.shared);
        };
        // Without a held buffer the driver is filling it now: its next post answers.
        if let Some(head) = a.held_stats.take() {
            give_back(q, head);
        }
    }

    /// Reads the statistics buffers the driver posted; keeps the last one.
    fn process_stats(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(q) = a.stats.as_mut() else {
            return;
        };
        let mut returned = false;
        loop {
            if q.queue.disable_notification(&q.mem).is_err() {
                break;
            }
            let mut popped = 0;
            while let Some(chain) = q.queue.pop_descriptor_chain(&q.mem) {
                popped += 1;
                let head = chain.head_index();
                let buf = match read_chain(&q.mem, chain, MAX_STATS_BYTES) {
                    Ok((buf, _)) => buf,
                    Err(()) => {
                        self.shared
                            .counters
                            .bad_buffers
                            .fetch_add(1, Ordering::Relaxed);
                        Vec::new()
                    }
                };
                // A driver posts one buffer; one that posts more gets the older ones back.
                if let Some(old) = a.held_stats.replace(head) {
                    if let Err(e) = q.queue.add_used(&q.mem, old, 0) {
                        tracing::warn!("virtio-balloon: cannot return chain {old}: {e:?}");
                    }
                    returned = true;
                }
                self.shared
                    .counters
                    .stats_updates
                    .fetch_add(1, Ordering::Relaxed);
                let mut st = self.shared.stats_lock();
                let parsed = parse_stats(&buf, &mut st.stats);
                if parsed.trailing != 0 || parsed.unknown != 0 {
                    tracing::debug!("virtio-balloon: statistics with ignored entries: {parsed:?}");
                }
                st.generation += 1;
                self.shared.stats_changed.notify_all();
            }
            if !q.more_after_enable(popped) {
                break;
            }
        }
        if returned && q.queue.needs_notification(&q.mem).unwrap_or(true) {
            q.interrupt.notify_queue(q.index);
        }
    }
}

/// Wakes the statistics waiters: no fresh values will come.
fn decline_stats(shared: &Shared) {
    let mut st = shared.stats_lock();
    st.declined += 1;
    shared.stats_changed.notify_all();
}

/// Returns the statistics buffer `head` to the driver (asking it for fresh values).
fn give_back(q: &mut ActiveQueue, head: u16) {
    if let Err(e) = q.queue.add_used(&q.mem, head, 0) {
        tracing::warn!("virtio-balloon: cannot return chain {head}: {e:?}");
        return;
    }
    if q.queue.needs_notification(&q.mem).unwrap_or(true) {
        q.interrupt.notify_queue(q.index);
    }
}

/// The driver-readable bytes of `chain`, up to `max`, and whether there were more. Fails if a
/// descriptor is device-writable or outside guest memory.
fn read_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    max: usize,
) -> Result<(Vec<u8>, bool), ()> {
    let mut buf = Vec::new();
    for d in chain {
        if d.is_write_only() {
            return Err(());
        }
        let len = d.len() as usize;
        let n = len.min(max - buf.len());
        let at = buf.len();
        buf.resize(at + n, 0);
        mem.read_slice(&mut buf[at..], d.addr()).map_err(|_| ())?;
        if n < len {
            return Ok((buf, true));
        }
    }
    Ok((buf, false))
}

/// The frame numbers of an inflate or deflate buffer; counts a bad or oversized buffer.
fn chain_pfns(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    counters: &BalloonCounters,
) -> Vec<u32> {
    match read_chain(mem, chain, MAX_PFNS_PER_BUFFER * 4) {
        Ok((buf, truncated)) => {
            if truncated || !buf.len().is_multiple_of(4) {
                counters.bad_buffers.fetch_add(1, Ordering::Relaxed);
            }
            parse_pfns(&buf).collect()
        }
        Err(()) => {
            counters.bad_buffers.fetch_add(1, Ordering::Relaxed);
            Vec::new()
        }
    }
}

/// The host address of the guest pages `first..first + count`, if they are guest RAM in one
/// mapping.
fn host_range(mem: &GuestMemoryMmap, first: u64, count: u64) -> Option<*mut u8> {
    let addr = first.checked_shl(PAGE_SHIFT)?;
    let len = usize::try_from(count.checked_shl(PAGE_SHIFT)?).ok()?;
    let slice = GuestMemoryBackend::get_slice(mem, GuestAddress(addr), len).ok()?;
    // Discarded pages read back as zeros (or as the snapshot file's bytes, for memory a
    // restore mapped privately): their contents change, as if written.
    vm_memory::bitmap::Bitmap::mark_dirty(slice.bitmap(), 0, len);
    let ptr = slice.ptr_guard_mut().as_ptr();
    // Guest RAM is mapped page-aligned; anything else is not a page to discard.
    (ptr as usize)
        .is_multiple_of(PAGE_SIZE as usize)
        .then_some(ptr)
}

/// Gives the host memory behind the guest pages `first..first + count` back to the host.
fn discard(mem: &GuestMemoryMmap, first: u64, count: u64, counters: &BalloonCounters) {
    let Some(ptr) = host_range(mem, first, count) else {
        // Not one mapping: a run across a region boundary, or pages outside RAM.
        if count > 1 {
            for pfn in first..first + count {
                discard(mem, pfn, 1, counters);
            }
        } else {
            counters.invalid_pfns.fetch_add(1, Ordering::Relaxed);
        }
        return;
    };
    let len = (count << PAGE_SHIFT) as usize;
    // SAFETY: `ptr..ptr + len` lies inside one of the guest memory mappings `mem` keeps alive
    // (host_range checked it); they are private anonymous mappings, which MADV_DONTNEED leaves
    // mapped and reading as zeros afterwards. Host code only accesses guest memory through
    // volatile copies, never through Rust references, so no reference sees the change.
    let r = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTNEED) };
    if r == 0 {
        counters.inflated_pages.fetch_add(count, Ordering::Relaxed);
    } else {
        counters.discard_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "virtio-balloon: madvise of {count} pages failed: {}",
            io::Error::last_os_error()
        );
    }
}

/// Counts the pages of a deflate buffer (anonymous memory needs nothing done).
fn deflate(mem: &GuestMemoryMmap, pfns: &[u32], counters: &BalloonCounters) {
    for (first, count) in pfn_runs(pfns.iter().copied()) {
        let valid = if host_range(mem, first, count).is_some() {
            count
        } else {
            (first..first + count)
                .filter(|&p| host_range(mem, p, 1).is_some())
                .count() as u64
        };
        counters.deflated_pages.fetch_add(valid, Ordering::Relaxed);
        counters
            .invalid_pfns
            .fetch_add(count - valid, Ordering::Relaxed);
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // num_pages, actual; the free-page-hint and poison fields belong to features not
        // offered and read as zeros.
        let mut config = [0u8; 8];
        config[..4].copy_from_slice(
            &self
                .shared
                .target_pages
                .load(Ordering::Acquire)
                .to_le_bytes(),
        );
        config[4..].copy_from_slice(
            &self
                .shared
                .actual_pages
                .load(Ordering::Acquire)
                .to_le_bytes(),
        );
        crate::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        let mut actual = self
            .shared
            .actual_pages
            .load(Ordering::Acquire)
            .to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                break;
            };
            if (4..8).contains(&at) {
                actual[at as usize - 4] = b;
            }
        }
        self.shared
            .actual_pages
            .store(u32::from_le_bytes(actual), Ordering::Release);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let with_stats = a.features & feature::STATS_VQ != 0;
        let mut queues = a.into_queues(if with_stats { 3 } else { 2 })?.into_iter();
        let (Some(inflate), Some(deflate)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { want: 2, got: 0 });
        };
        let stats = queues.next();
        let resumed = self.resumed.take();
        self.active = Some(Active {
            inflate,
            deflate,
            held_stats: resumed
                .and_then(|r| r.held_stats)
                .filter(|_| stats.is_some()),
            stats,
            // The driver reads the target itself once it is up.
            notified_target: resumed.map_or_else(
                || self.shared.target_pages.load(Ordering::Acquire),
                |r| r.notified_target,
            ),
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.resumed = None;
        // A new driver starts with an empty balloon (Linux deflates it fully on removal).
        self.shared.actual_pages.store(0, Ordering::Release);
        decline_stats(&self.shared);
    }

    fn process_queue(&mut self, index: usize) {
        let counters = &self.shared.counters;
        match (index, self.active.as_mut()) {
            (INFLATE, Some(a)) => {
                a.inflate.serve(|mem, chain| {
                    for (first, count) in pfn_runs(chain_pfns(mem, chain, counters)) {
                        discard(mem, first, count, counters);
                    }
                    0
                });
            }
            (DEFLATE, Some(a)) => {
                a.deflate.serve(|mem, chain| {
                    deflate(mem, &chain_pfns(mem, chain, counters), counters);
                    0
                });
            }
            (STATS, Some(_)) => self.process_stats(),
            _ => {}
        }
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.shared.wake.as_raw_fd()]
    }

    fn process_backend(&mut self, index: usize) {
        if index == 0 {
            self.host_request();
        }
    }

    fn queue_positions(&self) -> Vec<Option<QueuePosition>> {
        match &self.active {
            Some(a) => vec![
                Some(a.inflate.position()),
                Some(a.deflate.position()),
                a.stats.as_ref().map(ActiveQueue::position),
            ],
            None => vec![None; 3],
        }
    }

    fn save_state(&self) -> Result<serde_json::Value, StateError> {
        let sh = &self.shared;
        encode(
            "virtio-balloon",
            &BalloonState {
                memory_bytes: sh.memory_bytes,
                target_pages: sh.target_pages.load(Ordering::Acquire),
                actual_pages: sh.actual_pages.load(Ordering::Acquire),
                stats: sh.stats_lock().stats.values.to_vec(),
                held_stats: self.active.as_ref().and_then(|a| a.held_stats),
                notified_target: self.active.as_ref().map(|a| a.notified_target),
            },
        )
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), StateError> {
        let s: BalloonState = decode("virtio-balloon", state)?;
        let sh = &self.shared;
        same(
            "guest memory size in bytes",
            s.memory_bytes,
            sh.memory_bytes,
        )?;
        if u64::from(s.target_pages) << PAGE_SHIFT > sh.memory_bytes {
            return Err(StateError::Invalid(format!(
                "balloon target of {} pages exceeds guest memory",
                s.target_pages
            )));
        }
        let mut values = [None; STAT_NAMES.len()];
        for (v, saved) in values.iter_mut().zip(&s.stats) {
            *v = *saved;
        }
        sh.target_pages.store(s.target_pages, Ordering::Release);
        sh.actual_pages.store(s.actual_pages, Ordering::Release);
        sh.stats_lock().stats = BalloonStats { values };
        self.resumed = s.notified_target.map(|notified_target| Resumed {
            held_stats: s.held_stats,
            notified_target,
        });
        // A target set just before the snapshot may not have reached the driver: look once
        // the event loop runs (the wake-up in the old process's event stayed there).
        let _ = sh.wake.write(1);
        Ok(())
    }
}

/// Longest control line accepted, newline included.
const MAX_CONTROL_LINE: usize = 256;
/// How often a control connection's read gives up waiting, to notice the device is gone.
const CONTROL_POLL: Duration = Duration::from_millis(250);

/// The control socket and the thread that serves it, one client at a time. Dropping it stops
/// the thread (within [`CONTROL_POLL`], or once a statistics request it waits on is over)
/// and removes the socket file.
struct ControlServer {
    stop: Arc<AtomicBool>,
    /// Wakes the thread's poll when `stop` is raised.
    stop_event: Arc<EventFd>,
    path: PathBuf,
    /// Device and inode of the socket file, to recognise it at clean-up.
    id: (u64, u64),
}

impl ControlServer {
    fn start(path: &Path, handle: BalloonHandle) -> Result<ControlServer, BalloonError> {
        let listener = bind(path)?;
        let meta = std::fs::symlink_metadata(path).map_err(|source| BalloonError::Listen {
            path: path.to_owned(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_event = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(BalloonError::Setup)?);
        let (s, e) = (stop.clone(), stop_event.clone());
        std::thread::Builder::new()
            .name("balloon-control".into())
            .spawn(move || serve_control(listener, &handle, &s, &e))
            .map_err(BalloonError::Setup)?;
        Ok(ControlServer {
            stop,
            stop_event,
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.stop_event.write(1);
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Listens on `path`: its directory must exist; a socket file nobody listens on any more is
/// replaced, a live one or any other kind of file is refused.
fn bind(path: &Path) -> Result<UnixListener, BalloonError> {
    let listen_err = |source| BalloonError::Listen {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(BalloonError::NoDirectory(path.to_owned()));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BalloonError::NotASocket(path.to_owned()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(BalloonError::InUse(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(listen_err)?
            }
            Err(e) => return Err(listen_err(e)),
        }
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    Ok(listener)
}

/// Waits until `fd` or the stop event is readable; false when stopping.
fn wait_readable(fd: RawFd, stop: &AtomicBool, stop_event: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop_event.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    while !stop.load(Ordering::Acquire) {
        // SAFETY: `fds` is an array of two initialised pollfds that poll may write the
        // `revents` of; its length is passed with it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n > 0 && fds[0].revents != 0 {
            return true;
        }
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
    false
}

/// The control thread: accepts clients one at a time until the device is dropped.
fn serve_control(
    listener: UnixListener,
    handle: &BalloonHandle,
    stop: &AtomicBool,
    stop_event: &EventFd,
) {
    while wait_readable(listener.as_raw_fd(), stop, stop_event) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!("virtio-balloon: control socket: {e}");
                continue;
            }
        };
        if client.set_nonblocking(false).is_ok()
            && client.set_read_timeout(Some(CONTROL_POLL)).is_ok()
        {
            serve_client(client, handle, stop);
        }
    }
}

/// Answers the lines of one client until it closes, sends a line too long, or the device is
/// dropped.
fn serve_client(mut client: UnixStream, handle: &BalloonHandle, stop: &AtomicBool) {
    let mut pending = Vec::new();
    let mut buf = [0u8; MAX_CONTROL_LINE];
    while !stop.load(Ordering::Acquire) {
        let n = match client.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]);
            let reply = answer(handle, line.trim_end_matches('\r'));
            if client.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
        if pending.len() >= MAX_CONTROL_LINE {
            let _ = client.write_all(b"error: line too long\n");
            return;
        }
    }
}

/// The reply to one control line, ending with `ok` or `error: ...`.
fn answer(handle: &BalloonHandle, line: &str) -> String {
    match parse_command(line) {
        Ok(ControlCommand::Set(bytes)) => match handle.set_target(bytes) {
            Ok(()) => "ok\n".into(),
            Err(e) => format!("error: {e}\n"),
        },
        Ok(ControlCommand::Stats) => {
            let (stats, fresh) = handle.request_stats(STATS_TIMEOUT);
            report(handle, &stats, fresh)
        }
        Err(e) => format!("error: {e}\n"),
    }
}

/// The `stats` reply: target, actual, the guest's statistics and the device's counters.
fn report(handle: &BalloonHandle, stats: &BalloonStats, fresh: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "target_bytes={}", handle.target_bytes());
    let _ = writeln!(out, "actual_bytes={}", handle.actual_bytes());
    let _ = writeln!(out, "stats_fresh={}", u8::from(fresh));
    for (name, value) in STAT_NAMES.iter().zip(stats.values) {
        if let Some(v) = value {
            let _ = writeln!(out, "{name}={v}");
        }
    }
    let c = handle.counters();
    for (name, counter) in [
        ("inflated_pages", &c.inflated_pages),
        ("deflated_pages", &c.deflated_pages),
        ("invalid_pfns", &c.invalid_pfns),
        ("bad_buffers", &c.bad_buffers),
        ("discard_errors", &c.discard_errors),
        ("stats_updates", &c.stats_updates),
    ] {
        let _ = writeln!(out, "{name}={}", counter.load(Ordering::Relaxed));
    }
    out.push_str("ok\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pfns_are_le32_and_a_partial_one_is_ignored() {
        let buf = [1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 7, 0];
        assert_eq!(parse_pfns(&buf).collect::<Vec<_>>(), [1, u32::MAX]);
        assert_eq!(parse_pfns(&[]).count(), 0);
    }

    #[test]
    fn consecutive_pfns_make_runs() {
        assert_eq!(pfn_runs([5, 6, 7, 2]), [(5, 3), (2, 1)]);
        assert_eq!(pfn_runs([3, 3]), [(3, 1), (3, 1)]);
        assert_eq!(pfn_runs([9, 8]), [(9, 1), (8, 1)]);
        assert_eq!(
            pfn_runs([u32::MAX - 1, u32::MAX]),
            [(u64::from(u32::MAX) - 1, 2)]
        );
        assert!(pfn_runs([]).is_empty());
    }

    fn entry(tag: u16, value: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&value.to_le_bytes());
        e
    }

    #[test]
    fn stats_keep_known_tags_and_ignore_the_rest() {
        let mut buf = entry(4, 100 << 20);
        buf.extend(entry(5, 1 << 30));
        buf.extend(entry(77, 1));
        buf.extend(entry(4, 99 << 20));
        buf.extend_from_slice(&[6, 0, 1]);
        let mut stats = BalloonStats::default();
        let parsed = parse_stats(&buf, &mut stats);
        assert_eq!(
            parsed,
            ParsedStats {
                known: 3,
                unknown: 1,
                trailing: 3
            }
        );
        assert_eq!(stats.get("free_memory"), Some(99 << 20));
        assert_eq!(stats.get("total_memory"), Some(1 << 30));
        assert_eq!(stats.get("available_memory"), None);
        assert_eq!(stats.get("no_such_stat"), None);
        // A later buffer updates what it names and keeps the rest.
        parse_stats(&entry(6, 5), &mut stats);
        assert_eq!(stats.get("available_memory"), Some(5));
        assert_eq!(stats.get("total_memory"), Some(1 << 30));
    }

    #[test]
    fn control_lines_parse() {
        assert_eq!(
            parse_command("set 512M"),
            Ok(ControlCommand::Set(512 << 20))
        );
        assert_eq!(parse_command("set 0"), Ok(ControlCommand::Set(0)));
        assert_eq!(parse_command(" set  1G "), Ok(ControlCommand::Set(1 << 30)));
        assert_eq!(parse_command("set 64"), Ok(ControlCommand::Set(64 << 20)));
        assert_eq!(parse_command("stats"), Ok(ControlCommand::Stats));
        for bad in [
            "",
            "set",
            "set 1K",
            "set x",
            "set 1G 2G",
            "stats now",
            "get",
            "set -1M",
        ] {
            assert!(parse_command(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn targets_beyond_guest_memory_are_refused() {
        let b = Balloon::new(64 << 20, 16 << 20, false, None).unwrap();
        let h = b.handle();
        assert_eq!(h.target_bytes(), 16 << 20);
        assert!(h.set_target(65 << 20).is_err());
        assert!(h.set_target(64 << 20).is_ok());
        let mut cfg = [0u8; 8];
        b.read_config(0, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg[..4].try_into().unwrap()), 16384);
        assert!(Balloon::new(64 << 20, 128 << 20, false, None).is_err());
    }

    #[test]
    fn only_actual_is_writable_and_reads_past_the_end_are_zero() {
        let mut b = Balloon::new(64 << 20, 4 << 20, true, None).unwrap();
        assert_ne!(b.features() & feature::DEFLATE_ON_OOM, 0);
        b.write_config(0, &[0xff; 4]);
        b.write_config(4, &1234u32.to_le_bytes());
        b.write_config(7, &[1, 2, 3]);
        b.write_config(u64::MAX, &[9, 9]);
        let mut cfg = [0xaau8; 12];
        b.read_config(0, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg[..4].try_into().unwrap()), 1024);
        assert_eq!(
            u32::from_le_bytes(cfg[4..8].try_into().unwrap()),
            1234 | 1 << 24
        );
        assert_eq!(cfg[8..], [0; 4]);
        let mut one = [0xaa];
        b.read_config(u64::MAX, &mut one);
        assert_eq!(one, [0]);
        assert_eq!(
            b.handle().actual_bytes(),
            u64::from(1234u32 | 1 << 24) << 12
        );
    }

    #[test]
    fn stats_requests_without_a_driver_return_at_once() {
        let mut b = Balloon::new(64 << 20, 0, false, None).unwrap();
        let h = b.handle();
        let t = std::thread::spawn(move || h.request_stats(Duration::from_secs(30)));
        // The event loop's turn: no driver, so the request is declined.
        while !t.is_finished() {
            b.process_backend(0);
            std::thread::sleep(Duration::from_millis(1));
        }
        let (_, fresh) = t.join().unwrap();
        assert!(!fresh);
    }

    /// Guest RAM with a page of PFNs at 0x1000 and an inflate chain pointing at it.
    #[test]
    fn inflate_discards_valid_pages_and_counts_invalid_ones() {
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        // Page 0x20 holds data that must read as zeros after the discard.
        mem.write_slice(&[0x5a; 4096], GuestAddress(0x20 << 12))
            .unwrap();
        let pfns: Vec<u8> = [0x20u32, 0x21, 0x1000, u32::MAX]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        mem.write_slice(&pfns, GuestAddress(0x1000)).unwrap();
        let counters = BalloonCounters::default();
        let vq = MockSplitQueue::new(&mem, 16);
        let desc = RawDescriptor::from(SplitDescriptor::new(0x1000, pfns.len() as u32, 0, 0));
        vq.build_desc_chain(&[desc]).unwrap();
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        for (first, count) in pfn_runs(chain_pfns(&mem, chain, &counters)) {
            discard(&mem, first, count, &counters);
        }
        assert_eq!(counters.inflated_pages.load(Ordering::Relaxed), 2);
        assert_eq!(counters.invalid_pfns.load(Ordering::Relaxed), 2);
        assert_eq!(counters.bad_buffers.load(Ordering::Relaxed), 0);
        let mut page = [1u8; 4096];
        mem.read_slice(&mut page, GuestAddress(0x20 << 12)).unwrap();
        assert!(page.iter().all(|&b| b == 0), "the page was not discarded");
        // The PFN list itself (page 1) was not touched.
        let mut back = vec![0u8; pfns.len()];
        mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert_eq!(back, pfns);

        deflate(&mem, &[0x20, 0x21, 0x40, 0x3f], &counters);
        assert_eq!(counters.deflated_pages.load(Ordering::Relaxed), 3);
        assert_eq!(counters.invalid_pfns.load(Ordering::Relaxed), 3);
    }
}
