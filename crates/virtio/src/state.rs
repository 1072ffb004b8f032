//! Snapshot support shared by the devices and the transport: the error type, a queue's
//! position, and (de)serializing a device's own state.
//!
//! A device's state is what it needs beyond the transport's (registers, queue set-up and
//! positions, MSI-X): for most devices a check that the device it is restored into was built
//! from a compatible configuration, plus the few values the driver or the host changed at run
//! time. It travels as a `serde_json::Value` so the transport can carry any device's.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::device_type;

/// Why a device's state cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0} devices cannot be saved or restored")]
    Unsupported(&'static str),
    #[error("the saved state is of a {saved} device; this is a {here} device")]
    DeviceType {
        saved: &'static str,
        here: &'static str,
    },
    #[error("the saved {what} is {saved}; this device's is {here}")]
    Mismatch {
        what: &'static str,
        saved: String,
        here: String,
    },
    #[error("the saved {0} state cannot be read")]
    Malformed(&'static str, #[source] serde_json::Error),
    #[error("the {0} state cannot be written")]
    Encode(&'static str, #[source] serde_json::Error),
    #[error("the device is in use: restore only into one the driver has not set up")]
    InUse,
    #[error("the saved state is invalid: {0}")]
    Invalid(String),
    #[error("the device does not start from the saved state: {0}")]
    Start(String),
}

/// Where a device is in one of its queues: the next available-ring entry it will take and the
/// next used-ring entry it will fill (free-running 16-bit indices, as in the rings).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePosition {
    pub next_avail: u16,
    pub next_used: u16,
}

impl QueuePosition {
    /// The position of `queue`.
    pub fn of(queue: &virtio_queue::Queue) -> QueuePosition {
        use virtio_queue::QueueT;
        QueuePosition {
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }
}

/// The name of virtio device type `t`, for messages.
pub fn device_name(t: u32) -> &'static str {
    match t {
        device_type::NET => "virtio-net",
        device_type::BLOCK => "virtio-blk",
        device_type::CONSOLE => "virtio-console",
        device_type::RNG => "virtio-rng",
        device_type::BALLOON => "virtio-balloon",
        device_type::VSOCK => "virtio-vsock",
        _ => "unknown virtio",
    }
}

/// `state` as a JSON value; `what` names the device for messages.
pub(crate) fn encode<T: Serialize>(
    what: &'static str,
    state: &T,
) -> Result<serde_json::Value, StateError> {
    serde_json::to_value(state).map_err(|e| StateError::Encode(what, e))
}

/// The typed state in `value`; `what` names the device for messages.
pub(crate) fn decode<T: DeserializeOwned>(
    what: &'static str,
    value: &serde_json::Value,
) -> Result<T, StateError> {
    T::deserialize(value).map_err(|e| StateError::Malformed(what, e))
}

/// Fails with [`StateError::Mismatch`] unless `saved == here`.
pub(crate) fn same<T: PartialEq + std::fmt::Debug>(
    what: &'static str,
    saved: T,
    here: T,
) -> Result<(), StateError> {
    if saved == here {
        return Ok(());
    }
    Err(StateError::Mismatch {
        what,
        saved: format!("{saved:?}"),
        here: format!("{here:?}"),
    })
}
