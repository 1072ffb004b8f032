//! virtio-rng (virtio 1.2, 5.4): an entropy source fed from the host's `getrandom`. The driver
//! posts device-writable buffers; each is filled (up to [`MAX_FILL`] bytes) and returned.

use hypervisor::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::Bytes;

use crate::state::{decode, encode};
use crate::{
    device_type, features, ActivateError, Activation, ActiveQueue, QueuePosition, StateError,
    VirtioDevice,
};

const QUEUE_SIZE: u16 = 64;
/// Bytes handed out per request at most, so a guest asking for megabytes at a time cannot make
/// the event loop stall on one request.
pub const MAX_FILL: usize = 64 * 1024;

/// The entropy source has no state of its own; the empty record still tells it apart from
/// other devices' states.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RngState {}

#[derive(Default)]
pub struct Rng {
    active: Option<ActiveQueue>,
}

impl Rng {
    pub fn new() -> Self {
        Rng::default()
    }
}

/// Fills `buf` from the host's entropy pool.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        // SAFETY: the kernel writes at most `buf.len() - at` bytes at the pointer, inside `buf`.
        let n = unsafe { libc::getrandom(buf[at..].as_mut_ptr().cast(), buf.len() - at, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        at += n as usize;
    }
    Ok(())
}

/// Fills the device-writable buffers of `chain` with entropy, up to [`MAX_FILL`] bytes;
/// returns how many were written.
fn fill(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8; MAX_FILL],
) -> u32 {
    let mut written = 0usize;
    for d in chain.filter(|d| d.is_write_only()) {
        let n = (d.len() as usize).min(MAX_FILL - written);
        if n == 0
            || getrandom(&mut buf[..n]).is_err()
            || mem.write_slice(&buf[..n], d.addr()).is_err()
        {
            break;
        }
        written += n;
    }
    written as u32
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.active = Some(a.into_single_queue()?);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, index: usize) {
        if let (0, Some(a)) = (index, self.active.as_mut()) {
            let mut buf = Box::new([0u8; MAX_FILL]);
            a.serve(|mem, chain| fill(mem, chain, &mut buf));
        }
    }

    fn queue_positions(&self) -> Vec<Option<QueuePosition>> {
        vec![self.active.as_ref().map(ActiveQueue::position)]
    }

    fn save_state(&self) -> Result<serde_json::Value, StateError> {
        encode("virtio-rng", &RngState {})
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), StateError> {
        let RngState {} = decode("virtio-rng", state)?;
        Ok(())
    }
}
