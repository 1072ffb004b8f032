//! The common configuration structure of a virtio-pci device (virtio 1.2, 4.1.4.3): feature
//! negotiation, device status and per-queue set-up, as plain data. The transport acts on the
//! [`StatusChange`]s a write returns.

use crate::{features, status};

/// "No MSI-X vector" in `config_msix_vector` and `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;

/// Length of the structure (through `queue_reset`).
pub const COMMON_CFG_LEN: u64 = 0x3c;

/// What the driver programmed for one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSetup {
    pub max_size: u16,
    pub size: u16,
    pub msix_vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueSetup {
    fn new(max_size: u16) -> Self {
        QueueSetup {
            max_size,
            size: max_size,
            msix_vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// A change of device status the transport must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusChange {
    /// The driver wrote 0: reset the device.
    Reset,
    /// The driver set `DRIVER_OK`: start the device.
    DriverOk,
}

/// The common configuration registers.
#[derive(Clone, Debug)]
pub struct CommonConfig {
    pub device_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub config_msix_vector: u16,
    pub status: u8,
    pub config_generation: u8,
    pub queue_select: u16,
    pub queues: Vec<QueueSetup>,
    /// Number of MSI-X table entries; vectors at or above it read back as [`NO_VECTOR`].
    pub msix_entries: u16,
}

/// Field layout: (offset, width in bytes).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const QUEUE_NOTIFY_DATA: u64 = 0x38;
const QUEUE_RESET: u64 = 0x3a;

/// The field containing byte `offset`: its start and width.
fn field(offset: u64) -> Option<(u64, u64)> {
    let (start, width) = match offset {
        0x00..=0x03 => (DEVICE_FEATURE_SELECT, 4),
        0x04..=0x07 => (DEVICE_FEATURE, 4),
        0x08..=0x0b => (DRIVER_FEATURE_SELECT, 4),
        0x0c..=0x0f => (DRIVER_FEATURE, 4),
        0x10..=0x11 => (CONFIG_MSIX_VECTOR, 2),
        0x12..=0x13 => (NUM_QUEUES, 2),
        0x14 => (DEVICE_STATUS, 1),
        0x15 => (CONFIG_GENERATION, 1),
        0x16..=0x17 => (QUEUE_SELECT, 2),
        0x18..=0x19 => (QUEUE_SIZE, 2),
        0x1a..=0x1b => (QUEUE_MSIX_VECTOR, 2),
        0x1c..=0x1d => (QUEUE_ENABLE, 2),
        0x1e..=0x1f => (QUEUE_NOTIFY_OFF, 2),
        0x20..=0x27 => (QUEUE_DESC, 8),
        0x28..=0x2f => (QUEUE_DRIVER, 8),
        0x30..=0x37 => (QUEUE_DEVICE, 8),
        0x38..=0x39 => (QUEUE_NOTIFY_DATA, 2),
        0x3a..=0x3b => (QUEUE_RESET, 2),
        _ => return None,
    };
    Some((start, width))
}

impl CommonConfig {
    pub fn new(device_features: u64, queue_max_sizes: &[u16], msix_entries: u16) -> Self {
        CommonConfig {
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_msix_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: queue_max_sizes
                .iter()
                .map(|&m| QueueSetup::new(m))
                .collect(),
            msix_entries,
        }
    }

    /// Back to the state after power-on (a reset by the driver).
    pub fn reset(&mut self) {
        let max: Vec<u16> = self.queues.iter().map(|q| q.max_size).collect();
        *self = CommonConfig::new(self.device_features, &max, self.msix_entries);
    }

    fn selected(&self) -> Option<&QueueSetup> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn vector(&self, v: u16) -> u16 {
        if v < self.msix_entries {
            v
        } else {
            NO_VECTOR
        }
    }

    fn get(&self, start: u64) -> u64 {
        let q = self.selected();
        match start {
            DEVICE_FEATURE_SELECT => u64::from(self.device_feature_select),
            DEVICE_FEATURE => match self.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            DRIVER_FEATURE_SELECT => u64::from(self.driver_feature_select),
            DRIVER_FEATURE => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            CONFIG_MSIX_VECTOR => u64::from(self.config_msix_vector),
            NUM_QUEUES => self.queues.len() as u64,
            DEVICE_STATUS => u64::from(self.status),
            CONFIG_GENERATION => u64::from(self.config_generation),
            QUEUE_SELECT => u64::from(self.queue_select),
            // A queue that does not exist reads as size 0: not available.
            QUEUE_SIZE => q.map_or(0, |q| u64::from(q.size)),
            QUEUE_MSIX_VECTOR => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector)),
            QUEUE_ENABLE => q.map_or(0, |q| u64::from(q.enabled)),
            // Each queue has its own notification address: offset = index × multiplier.
            QUEUE_NOTIFY_OFF | QUEUE_NOTIFY_DATA => u64::from(self.queue_select),
            QUEUE_DESC => q.map_or(0, |q| q.desc),
            QUEUE_DRIVER => q.map_or(0, |q| q.driver),
            QUEUE_DEVICE => q.map_or(0, |q| q.device),
            _ => 0,
        }
    }

    /// Reads `data.len()` bytes at `offset` (any alignment; unknown bytes read 0).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *b = match field(at) {
                Some((start, _)) => (self.get(start) >> (8 * (at - start))) as u8,
                None => 0,
            };
        }
    }

    /// Writes `data` at `offset`. A write may cover part of a field (the two halves of a
    /// 64-bit address); it must not span two fields, and such writes are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<StatusChange> {
        let (start, width) = field(offset)?;
        let end = offset.checked_add(data.len() as u64)?;
        if data.is_empty() || end > start + width {
            return None;
        }
        let mut value = self.get(start);
        for (i, &b) in data.iter().enumerate() {
            let shift = 8 * (offset - start + i as u64);
            value = (value & !(0xff << shift)) | (u64::from(b) << shift);
        }
        self.set(start, value)
    }

    fn set(&mut self, start: u64, value: u64) -> Option<StatusChange> {
        let locked = self.status & status::FEATURES_OK != 0;
        let live = self.status & status::DRIVER_OK != 0;
        let vector = self.vector(value as u16);
        let q = self.queues.get_mut(usize::from(self.queue_select));
        match start {
            DEVICE_FEATURE_SELECT => self.device_feature_select = value as u32,
            DRIVER_FEATURE_SELECT => self.driver_feature_select = value as u32,
            DRIVER_FEATURE if !locked => {
                let v = value & 0xffff_ffff;
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            CONFIG_MSIX_VECTOR => self.config_msix_vector = vector,
            DEVICE_STATUS => return self.set_status(value as u8),
            QUEUE_SELECT => self.queue_select = value as u16,
            // Queue set-up is frozen once the queue is enabled or the device runs.
            _ if live || q.as_ref().is_none_or(|q| q.enabled) => {
                if let (QUEUE_MSIX_VECTOR, Some(q)) = (start, q) {
                    q.msix_vector = vector;
                }
            }
            QUEUE_SIZE => {
                if let Some(q) = q {
                    q.size = value as u16;
                }
            }
            QUEUE_MSIX_VECTOR => {
                if let Some(q) = q {
                    q.msix_vector = vector;
                }
            }
            QUEUE_ENABLE if value == 1 => {
                if let Some(q) = q {
                    q.enabled = true;
                }
            }
            QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE => {
                if let Some(q) = q {
                    match start {
                        QUEUE_DESC => q.desc = value,
                        QUEUE_DRIVER => q.driver = value,
                        _ => q.device = value,
                    }
                }
            }
            _ => {}
        }
        None
    }

    fn set_status(&mut self, new: u8) -> Option<StatusChange> {
        if new == 0 {
            self.reset();
            return Some(StatusChange::Reset);
        }
        let old = self.status;
        // Bits are only ever added until a reset.
        let mut new = new | old;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.device_features;
            if unknown != 0 || self.driver_features & features::VERSION_1 == 0 {
                // Not accepted: the driver reads FEATURES_OK back as clear and gives up.
                new &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            new &= !status::DRIVER_OK;
        }
        self.status = new;
        (new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0)
            .then_some(StatusChange::DriverOk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CommonConfig {
        CommonConfig::new(features::VERSION_1 | 1, &[256, 128], 3)
    }

    fn read32(c: &CommonConfig, off: u64) -> u32 {
        let mut b = [0; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn read16(c: &CommonConfig, off: u64) -> u16 {
        let mut b = [0; 2];
        c.read(off, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn features_are_read_in_two_halves_and_negotiated() {
        let mut c = cfg();
        assert_eq!(read32(&c, DEVICE_FEATURE), 1);
        c.write(DEVICE_FEATURE_SELECT, &1u32.to_le_bytes());
        assert_eq!(read32(&c, DEVICE_FEATURE), 1);
        c.write(DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
        c.write(DRIVER_FEATURE, &1u32.to_le_bytes());
        c.write(
            DEVICE_STATUS,
            &[status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK],
        );
        assert_ne!(c.status & status::FEATURES_OK, 0);
        assert_eq!(c.driver_features, features::VERSION_1);
    }

    #[test]
    fn features_the_device_lacks_are_refused() {
        let mut c = cfg();
        c.write(DRIVER_FEATURE, &2u32.to_le_bytes());
        c.write(DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
        c.write(DRIVER_FEATURE, &1u32.to_le_bytes());
        c.write(DEVICE_STATUS, &[status::FEATURES_OK]);
        assert_eq!(c.status & status::FEATURES_OK, 0);
        // Without FEATURES_OK the device never starts.
        assert_eq!(c.write(DEVICE_STATUS, &[status::DRIVER_OK]), None);
    }

    #[test]
    fn a_legacy_driver_is_refused() {
        let mut c = cfg();
        c.write(DEVICE_STATUS, &[status::FEATURES_OK]);
        assert_eq!(c.status & status::FEATURES_OK, 0);
    }

    #[test]
    fn queues_are_programmed_through_the_selector() {
        let mut c = cfg();
        assert_eq!(read16(&c, NUM_QUEUES), 2);
        c.write(QUEUE_SELECT, &1u16.to_le_bytes());
        assert_eq!(read16(&c, QUEUE_SIZE), 128);
        assert_eq!(read16(&c, QUEUE_NOTIFY_OFF), 1);
        c.write(QUEUE_SIZE, &64u16.to_le_bytes());
        c.write(QUEUE_DESC, &0x1000u32.to_le_bytes());
        c.write(QUEUE_DESC + 4, &0x2u32.to_le_bytes());
        c.write(QUEUE_MSIX_VECTOR, &2u16.to_le_bytes());
        c.write(QUEUE_ENABLE, &1u16.to_le_bytes());
        let q = c.queues[1];
        assert_eq!(
            (q.size, q.desc, q.msix_vector, q.enabled),
            (64, 0x2_0000_1000, 2, true)
        );
        // Frozen once enabled.
        c.write(QUEUE_SIZE, &32u16.to_le_bytes());
        assert_eq!(c.queues[1].size, 64);
        // A queue that does not exist.
        c.write(QUEUE_SELECT, &9u16.to_le_bytes());
        assert_eq!(read16(&c, QUEUE_SIZE), 0);
        c.write(QUEUE_ENABLE, &1u16.to_le_bytes());
    }

    #[test]
    fn vectors_beyond_the_table_read_back_as_none() {
        let mut c = cfg();
        c.write(CONFIG_MSIX_VECTOR, &7u16.to_le_bytes());
        assert_eq!(read16(&c, CONFIG_MSIX_VECTOR), NO_VECTOR);
        c.write(CONFIG_MSIX_VECTOR, &2u16.to_le_bytes());
        assert_eq!(read16(&c, CONFIG_MSIX_VECTOR), 2);
    }

    #[test]
    fn driver_ok_starts_once_and_zero_resets() {
        let mut c = cfg();
        c.write(DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
        c.write(DRIVER_FEATURE, &1u32.to_le_bytes());
        c.write(DEVICE_STATUS, &[status::FEATURES_OK]);
        let ok = status::FEATURES_OK | status::DRIVER_OK;
        assert_eq!(c.write(DEVICE_STATUS, &[ok]), Some(StatusChange::DriverOk));
        assert_eq!(c.write(DEVICE_STATUS, &[ok]), None);
        assert_eq!(c.write(DEVICE_STATUS, &[0]), Some(StatusChange::Reset));
        assert_eq!(c.status, 0);
        assert_eq!(c.driver_features, 0);
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let mut c = cfg();
        for off in 0..0x50u64 {
            for len in [1usize, 2, 3, 4, 8] {
                let mut b = vec![0; len];
                c.read(off, &mut b);
                c.write(off, &vec![0xff; len]);
            }
        }
        c.read(u64::MAX - 1, &mut [0; 4]);
        c.write(u64::MAX - 1, &[1, 2, 3, 4]);
    }
}
