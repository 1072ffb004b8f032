//! MSI-X (PCI Local Bus 3.0, 6.8.2): the vector table and pending-bit array the guest programs
//! through a BAR, and the capability's enable and function-mask bits. Each table entry drives
//! one [`MsiVector`] of the hypervisor seam; a masked vector that fires sets its pending bit
//! and is sent when unmasked.

use std::sync::Arc;

use hypervisor::{MsiMessage, MsiVector};

/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_LEN: u64 = 16;
/// Vector control bit 0: masked.
const ENTRY_MASKED: u32 = 1;
/// Message control: MSI-X enable and function mask.
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;

/// The MSI-X state as saved for a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// The enable and function-mask bits of the message control word.
    pub enabled: bool,
    pub function_masked: bool,
    /// Each table entry as four dwords: address low, address high, data, vector control.
    pub table: Vec<[u32; 4]>,
    /// The pending bits.
    pub pending: Vec<bool>,
}

pub struct Msix {
    /// Each entry as four dwords.
    table: Vec<[u32; 4]>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    vectors: Vec<Arc<dyn MsiVector>>,
}

impl Msix {
    /// A table with one entry per vector, all masked (the reset state).
    pub fn new(vectors: Vec<Arc<dyn MsiVector>>) -> Self {
        let n = vectors.len();
        Msix {
            table: vec![[0, 0, 0, ENTRY_MASKED]; n],
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
            vectors,
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// The state for a snapshot.
    pub fn save(&self) -> MsixState {
        MsixState {
            enabled: self.enabled,
            function_masked: self.function_masked,
            table: self.table.clone(),
            pending: self.pending.clone(),
        }
    }

    /// Whether `state` fits this table (same number of entries).
    pub fn check(&self, state: &MsixState) -> Result<(), String> {
        let n = self.table.len();
        if state.table.len() != n || state.pending.len() != n {
            return Err(format!(
                "{} MSI-X table entries and {} pending bits saved for a table of {n}",
                state.table.len(),
                state.pending.len()
            ));
        }
        Ok(())
    }

    /// Puts back a checked state and programs each vector with its entry's message, as the
    /// guest's writes did. Entries the guest never wrote (address and data 0) are left
    /// unprogrammed. Nothing is sent: see [`send_pending`](Self::send_pending).
    pub fn restore(&mut self, state: &MsixState) {
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        self.table.clone_from(&state.table);
        self.pending.clone_from(&state.pending);
        for (e, &[lo, hi, data, _]) in self.table.iter().enumerate() {
            if lo == 0 && hi == 0 && data == 0 {
                continue;
            }
            let msg = MsiMessage {
                addr: u64::from(lo) | (u64::from(hi) << 32),
                data,
            };
            if let Err(err) = self.vectors[e].set_message(msg) {
                tracing::warn!("virtio: cannot program MSI-X vector {e}: {err}");
            }
        }
    }

    /// The guest wrote the message control word.
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.send_pending();
    }

    fn masked(&self, v: usize) -> bool {
        self.function_masked || self.table[v][3] & ENTRY_MASKED != 0
    }

    /// Sends vector `v`, or marks it pending while masked. With MSI-X disabled nothing is sent:
    /// these devices have no INTx line.
    pub fn trigger(&mut self, v: u16) {
        let v = usize::from(v);
        if v >= self.table.len() || !self.enabled {
            return;
        }
        if self.masked(v) {
            self.pending[v] = true;
            return;
        }
        if let Err(e) = self.vectors[v].trigger() {
            tracing::warn!("virtio: cannot send MSI-X vector {v}: {e}");
        }
    }

    /// Sends the pending vectors that are no longer masked.
    pub fn send_pending(&mut self) {
        if !self.enabled {
            return;
        }
        for v in 0..self.table.len() {
            if self.pending[v] && !self.masked(v) {
                self.pending[v] = false;
                if let Err(e) = self.vectors[v].trigger() {
                    tracing::warn!("virtio: cannot send MSI-X vector {v}: {e}");
                }
            }
        }
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            let (e, w) = ((at / ENTRY_LEN) as usize, ((at % ENTRY_LEN) / 4) as usize);
            *b = self
                .table
                .get(e)
                .map_or(0, |entry| (entry[w] >> (8 * (at % 4))) as u8);
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let mut touched: Vec<usize> = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            let (e, w) = ((at / ENTRY_LEN) as usize, ((at % ENTRY_LEN) / 4) as usize);
            let Some(entry) = self.table.get_mut(e) else {
                continue;
            };
            let shift = 8 * (at % 4);
            entry[w] = (entry[w] & !(0xff << shift)) | (u32::from(b) << shift);
            if touched.last() != Some(&e) {
                touched.push(e);
            }
        }
        for e in touched {
            let [lo, hi, data, _] = self.table[e];
            let msg = MsiMessage {
                addr: u64::from(lo) | (u64::from(hi) << 32),
                data,
            };
            if let Err(err) = self.vectors[e].set_message(msg) {
                tracing::warn!("virtio: cannot program MSI-X vector {e}: {err}");
            }
        }
        self.send_pending();
    }

    /// The pending-bit array, as 64-bit words.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let bit0 = offset.saturating_add(i as u64).saturating_mul(8);
            *b = (0..8u64).fold(0u8, |acc, k| {
                let v = bit0.saturating_add(k) as usize;
                acc | (u8::from(self.pending.get(v).copied().unwrap_or(false)) << k)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder {
        fired: AtomicUsize,
        msg: Mutex<Option<MsiMessage>>,
    }

    impl MsiVector for Recorder {
        fn set_message(&self, msg: MsiMessage) -> io::Result<()> {
            *self.msg.lock().unwrap() = Some(msg);
            Ok(())
        }
        fn trigger(&self) -> io::Result<()> {
            self.fired.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn setup() -> (Msix, Vec<Arc<Recorder>>) {
        let recs: Vec<Arc<Recorder>> = (0..2).map(|_| Arc::new(Recorder::default())).collect();
        let vectors = recs
            .iter()
            .map(|r| r.clone() as Arc<dyn MsiVector>)
            .collect();
        (Msix::new(vectors), recs)
    }

    #[test]
    fn a_programmed_unmasked_vector_fires() {
        let (mut m, recs) = setup();
        m.set_control(CONTROL_ENABLE);
        m.write_table(16, &0xfee0_0000u32.to_le_bytes());
        m.write_table(24, &0x41u32.to_le_bytes());
        m.write_table(28, &0u32.to_le_bytes());
        assert_eq!(
            *recs[1].msg.lock().unwrap(),
            Some(MsiMessage {
                addr: 0xfee0_0000,
                data: 0x41
            })
        );
        m.trigger(1);
        assert_eq!(recs[1].fired.load(Ordering::SeqCst), 1);
        assert_eq!(recs[0].fired.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn masked_vectors_are_pending_until_unmasked() {
        let (mut m, recs) = setup();
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.write_table(12, &0u32.to_le_bytes());
        m.trigger(0);
        assert_eq!(recs[0].fired.load(Ordering::SeqCst), 0);
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(recs[0].fired.load(Ordering::SeqCst), 1);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn disabled_msix_sends_nothing_and_out_of_range_is_ignored() {
        let (mut m, recs) = setup();
        m.write_table(12, &0u32.to_le_bytes());
        m.trigger(0);
        m.trigger(7);
        assert_eq!(recs[0].fired.load(Ordering::SeqCst), 0);
        m.write_table(u64::MAX - 2, &[1, 2, 3, 4]);
        m.read_table(u64::MAX - 2, &mut [0; 4]);
        m.read_pba(u64::MAX - 2, &mut [0; 4]);
    }
}
