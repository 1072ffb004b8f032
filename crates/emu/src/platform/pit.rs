//! The 8254 programmable interval timer at ports 0x40–0x43, with the port 0x61 bits that belong
//! to it (channel 2 gate in bit 0, speaker data enable in bit 1, refresh toggle in bit 4,
//! channel 2 output in bit 5).
//!
//! The counters run at [`PIT_HZ`] (1.193182 MHz) on the `now_ns` time line: a channel's state
//! is the tick count when it was loaded, and the count and output are computed from the ticks
//! elapsed since, so reads are exact and cost nothing while nobody looks. Modes 0 (interrupt on
//! terminal count), 2 (rate generator), 3 (square wave) and 4 (software strobe) are modelled;
//! modes 1 and 5 (hardware-triggered) count like 0 and 4, without gate triggering. Gate low
//! pauses modes 0/4 and holds modes 2/3 with output high, restarting them on the rising edge;
//! only channel 2's gate is wired (port 0x61), channels 0 and 1 are always gated on. A new
//! count takes effect at once (also in modes 2/3, where real parts wait for the period's end).
//! BCD mode is remembered and reported in the status byte, but counting is binary. The latch
//! command, the read-back command (count and status) and the lobyte/hibyte/lobyte-then-hibyte
//! access modes are supported.
//!
//! Channel 0's output drives ISA IRQ 0 (GSI 2 on this platform): [`Pit::poll`] says whether it
//! had a rising edge since the last poll (many missed edges count as one), and
//! [`Pit::next_deadline_ns`] when the next one is due, but no sooner than
//! [`MIN_IRQ_INTERVAL_NS`] after the last poll, so a tiny divisor cannot make the VM spin.

/// The PIT's input clock, Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// Shortest interval between IRQ 0 wake-ups [`Pit::next_deadline_ns`] asks for.
pub const MIN_IRQ_INTERVAL_NS: u64 = 100_000;

const NS_PER_SEC: u128 = 1_000_000_000;
/// Half period of the port 0x61 refresh toggle (bit 4), ns.
const REFRESH_HALF_PERIOD_NS: u64 = 15_085;

/// PIT ticks elapsed at `now_ns`.
pub fn ns_to_ticks(now_ns: u64) -> u64 {
    u64::try_from(u128::from(now_ns) * u128::from(PIT_HZ) / NS_PER_SEC).unwrap_or(u64::MAX)
}

/// The first nanosecond at which `ticks` PIT ticks have elapsed.
pub fn ticks_to_ns_ceil(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * NS_PER_SEC).div_ceil(u128::from(PIT_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// Access mode of a channel (control word bits 5:4).
pub const ACCESS_LOBYTE: u8 = 1;
pub const ACCESS_HIBYTE: u8 = 2;
pub const ACCESS_LOHI: u8 = 3;

/// One channel, for snapshots (and the live representation).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PitChannelState {
    /// Counting mode 0–5.
    pub mode: u8,
    /// [`ACCESS_LOBYTE`], [`ACCESS_HIBYTE`] or [`ACCESS_LOHI`].
    pub access: u8,
    pub bcd: bool,
    /// The loaded count, 1..=65536 (a written 0 means 65536).
    pub reload: u32,
    /// A count has been written since the last control word.
    pub armed: bool,
    /// Ticks counted before the current run (the channel was paused by its gate).
    pub elapsed_before: u64,
    /// Tick at which the current run started; `None` while not counting.
    pub run_start: Option<u64>,
    pub gate: bool,
    /// Low byte of a lobyte-then-hibyte count write in progress.
    pub write_lsb: Option<u8>,
    /// Next live read in lobyte-then-hibyte mode returns the high byte.
    pub read_msb_next: bool,
    /// Latched count (latch or read-back command), not yet fully read.
    pub latched: Option<u16>,
    /// Next read of the latched count returns its high byte.
    pub latch_msb_next: bool,
    /// Latched status byte (read-back command), read before any count.
    pub status_latched: Option<u8>,
    /// Output rising edges already reported by `poll` (channel 0).
    pub edges_seen: u64,
}

impl Default for PitChannelState {
    fn default() -> Self {
        PitChannelState {
            mode: 0,
            access: ACCESS_LOHI,
            bcd: false,
            reload: 0x1_0000,
            armed: false,
            elapsed_before: 0,
            run_start: None,
            gate: true,
            write_lsb: None,
            read_msb_next: false,
            latched: None,
            latch_msb_next: false,
            status_latched: None,
            edges_seen: 0,
        }
    }
}

/// The PIT's state, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PitState {
    pub channels: [PitChannelState; 3],
    /// Port 0x61 bits 0–3 as last written.
    pub port61: u8,
    /// Time of the last `poll`.
    pub last_poll_ns: u64,
}

impl PitChannelState {
    /// Modes 1 and 5 are modelled as 0 and 4; 6 and 7 are aliases of 2 and 3.
    fn effective_mode(&self) -> u8 {
        match self.mode {
            1 => 0,
            5 => 4,
            m => m,
        }
    }

    fn elapsed(&self, tick: u64) -> u64 {
        let run = self.run_start.map_or(0, |s| tick.saturating_sub(s));
        self.elapsed_before.saturating_add(run)
    }

    fn count_at(&self, tick: u64) -> u16 {
        if !self.armed {
            return 0;
        }
        let n = u64::from(self.reload.max(1));
        let e = self.elapsed(tick);
        let c = match self.effective_mode() {
            2 => n - e % n,
            3 => {
                let p = e % n;
                let high = n.div_ceil(2);
                if p < high {
                    n - 2 * p
                } else {
                    n.saturating_sub(2 * (p - high))
                }
            }
            _ => (n + 0x1_0000 - (e & 0xffff)) & 0xffff,
        };
        (c & 0xffff) as u16
    }

    fn output_at(&self, tick: u64) -> bool {
        let mode = self.effective_mode();
        if !self.armed {
            return mode != 0;
        }
        let n = u64::from(self.reload.max(1));
        let e = self.elapsed(tick);
        match mode {
            0 => e >= n,
            2 => !self.gate || e % n != n - 1,
            3 => !self.gate || e % n < n.div_ceil(2),
            _ => e != n,
        }
    }

    /// Rising output edges since the count was loaded.
    fn edges_at(&self, tick: u64) -> u64 {
        if !self.armed {
            return 0;
        }
        let n = u64::from(self.reload.max(1));
        let e = self.elapsed(tick);
        match self.effective_mode() {
            0 => u64::from(e >= n),
            2 | 3 => e / n,
            _ => u64::from(e > n),
        }
    }

    /// Elapsed count at which rising edge number `k` (1-based) happens.
    fn edge_elapsed(&self, k: u64) -> Option<u64> {
        let n = u64::from(self.reload.max(1));
        match self.effective_mode() {
            0 => (k == 1).then_some(n),
            2 | 3 => k.checked_mul(n),
            _ => (k == 1).then_some(n + 1),
        }
    }

    fn load(&mut self, reload: u32, tick: u64) {
        self.reload = if reload == 0 { 0x1_0000 } else { reload };
        self.armed = true;
        self.elapsed_before = 0;
        self.run_start = self.gate.then_some(tick);
        self.edges_seen = 0;
    }

    fn set_gate(&mut self, gate: bool, tick: u64) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        if !self.armed {
            return;
        }
        match (self.effective_mode(), gate) {
            (0 | 4, false) => {
                self.elapsed_before = self.elapsed(tick);
                self.run_start = None;
            }
            (0 | 4, true) => self.run_start = Some(tick),
            (_, false) => self.run_start = None,
            (_, true) => {
                self.elapsed_before = 0;
                self.run_start = Some(tick);
                self.edges_seen = 0;
            }
        }
    }

    fn status(&self, tick: u64) -> u8 {
        (u8::from(self.output_at(tick)) << 7)
            | (u8::from(!self.armed) << 6)
            | ((self.access & 3) << 4)
            | ((self.mode & 7) << 1)
            | u8::from(self.bcd)
    }

    fn latch_count(&mut self, tick: u64) {
        if self.latched.is_none() {
            self.latched = Some(self.count_at(tick));
            self.latch_msb_next = false;
        }
    }

    fn control(&mut self, value: u8) {
        self.access = (value >> 4) & 3;
        let mode = (value >> 1) & 7;
        self.mode = if mode >= 6 { mode - 4 } else { mode };
        self.bcd = value & 1 != 0;
        self.armed = false;
        self.run_start = None;
        self.elapsed_before = 0;
        self.write_lsb = None;
        self.read_msb_next = false;
        self.latched = None;
        self.latch_msb_next = false;
        self.status_latched = None;
        self.edges_seen = 0;
    }

    fn read(&mut self, tick: u64) -> u8 {
        if let Some(status) = self.status_latched.take() {
            return status;
        }
        if let Some(l) = self.latched {
            let [lo, hi] = l.to_le_bytes();
            return match self.access {
                ACCESS_LOBYTE => {
                    self.latched = None;
                    lo
                }
                ACCESS_HIBYTE => {
                    self.latched = None;
                    hi
                }
                _ if !self.latch_msb_next => {
                    self.latch_msb_next = true;
                    lo
                }
                _ => {
                    self.latched = None;
                    self.latch_msb_next = false;
                    hi
                }
            };
        }
        let [lo, hi] = self.count_at(tick).to_le_bytes();
        match self.access {
            ACCESS_LOBYTE => lo,
            ACCESS_HIBYTE => hi,
            _ => {
                self.read_msb_next = !self.read_msb_next;
                if self.read_msb_next {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    fn write(&mut self, value: u8, tick: u64) {
        match self.access {
            ACCESS_LOBYTE => self.load(u32::from(value), tick),
            ACCESS_HIBYTE => self.load(u32::from(value) << 8, tick),
            _ => match self.write_lsb.take() {
                None => self.write_lsb = Some(value),
                Some(lsb) => self.load(u32::from(lsb) | (u32::from(value) << 8), tick),
            },
        }
    }
}

/// The 8254 PIT.
#[derive(Clone, Debug, Default)]
pub struct Pit {
    s: PitState,
}

impl Pit {
    /// Power-on state: nothing programmed, gates of channels 0 and 1 on, channel 2's off.
    pub fn new() -> Self {
        let mut pit = Pit::default();
        pit.s.channels[2].gate = false;
        pit
    }

    pub fn reset(&mut self) {
        *self = Self::new();
    }

    pub fn state(&self) -> PitState {
        self.s.clone()
    }

    pub fn from_state(state: PitState) -> Self {
        Pit { s: state }
    }

    /// Whether `port` belongs to the PIT (0x40–0x43, 0x61).
    pub fn handles(port: u16) -> bool {
        matches!(port, 0x40..=0x43 | 0x61)
    }

    /// A byte read. The control port and foreign ports read 0xff.
    pub fn port_read(&mut self, port: u16, now_ns: u64) -> u8 {
        let tick = ns_to_ticks(now_ns);
        match port {
            0x40..=0x42 => self.s.channels[usize::from(port - 0x40)].read(tick),
            0x61 => {
                let ch2 = &self.s.channels[2];
                let refresh = (now_ns / REFRESH_HALF_PERIOD_NS) & 1 != 0;
                (self.s.port61 & 0x0f)
                    | (u8::from(refresh) << 4)
                    | (u8::from(ch2.output_at(tick)) << 5)
            }
            _ => 0xff,
        }
    }

    /// A byte write.
    pub fn port_write(&mut self, port: u16, value: u8, now_ns: u64) {
        let tick = ns_to_ticks(now_ns);
        match port {
            0x40..=0x42 => self.s.channels[usize::from(port - 0x40)].write(value, tick),
            0x43 => self.control(value, tick),
            0x61 => {
                self.s.port61 = value & 0x0f;
                self.s.channels[2].set_gate(value & 1 != 0, tick);
            }
            _ => {}
        }
    }

    fn control(&mut self, value: u8, tick: u64) {
        let sc = value >> 6;
        if sc == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status; bits 3:1
            // select channels 2, 1, 0.
            for (i, ch) in self.s.channels.iter_mut().enumerate() {
                if value & (2 << i) == 0 {
                    continue;
                }
                if value & 0x10 == 0 && ch.status_latched.is_none() {
                    ch.status_latched = Some(ch.status(tick));
                }
                if value & 0x20 == 0 {
                    ch.latch_count(tick);
                }
            }
            return;
        }
        let ch = &mut self.s.channels[usize::from(sc)];
        if (value >> 4) & 3 == 0 {
            ch.latch_count(tick);
        } else {
            ch.control(value);
        }
    }

    /// Whether channel 0's output had a rising edge since the last poll (then the VM raises
    /// IRQ 0, GSI 2). Missed edges are not replayed: one call reports at most one.
    pub fn poll(&mut self, now_ns: u64) -> bool {
        self.s.last_poll_ns = self.s.last_poll_ns.max(now_ns);
        let ch = &mut self.s.channels[0];
        let edges = ch.edges_at(ns_to_ticks(now_ns));
        if edges > ch.edges_seen {
            ch.edges_seen = edges;
            true
        } else {
            false
        }
    }

    /// When channel 0's next rising edge is due (not before `MIN_IRQ_INTERVAL_NS` after the
    /// last poll), or `None` if none will come.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let ch = &self.s.channels[0];
        let start = ch.run_start?;
        if !ch.armed {
            return None;
        }
        let e = ch.edge_elapsed(ch.edges_seen.checked_add(1)?)?;
        let tick = start.checked_add(e.checked_sub(ch.elapsed_before)?)?;
        let earliest = self.s.last_poll_ns.saturating_add(MIN_IRQ_INTERVAL_NS);
        Some(ticks_to_ns_ceil(tick).max(earliest))
    }

    /// Channel `channel`'s output level now (false for channels beyond 2).
    pub fn output(&self, channel: usize, now_ns: u64) -> bool {
        self.s
            .channels
            .get(channel)
            .is_some_and(|c| c.output_at(ns_to_ticks(now_ns)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read16(pit: &mut Pit, port: u16, now: u64) -> u16 {
        let lo = pit.port_read(port, now);
        let hi = pit.port_read(port, now);
        u16::from_le_bytes([lo, hi])
    }

    #[test]
    fn mode2_irq0_rate_is_pit_hz_over_divisor() {
        let mut pit = Pit::new();
        // Channel 0, lobyte/hibyte, mode 2, divisor 11932 (100 Hz).
        pit.port_write(0x43, 0x34, 0);
        pit.port_write(0x40, (11932 & 0xff) as u8, 0);
        pit.port_write(0x40, (11932 >> 8) as u8, 0);
        let mut irqs = 0;
        let mut now = 0;
        while now < 1_000_000_000 {
            now += 50_000;
            if pit.poll(now) {
                irqs += 1;
            }
        }
        // 1193182 / 11932 = 99.998... Hz → 99 edges in the first second (the 100th at 1.00002 s).
        assert_eq!(irqs, 99);
        assert!(pit.poll(1_000_020_000));
        let d = pit.next_deadline_ns().unwrap();
        assert_eq!(d, ticks_to_ns_ceil(101 * 11932));
    }

    #[test]
    fn next_deadline_predicts_the_edge() {
        let mut pit = Pit::new();
        pit.port_write(0x43, 0x34, 0);
        pit.port_write(0x40, 0x00, 0);
        pit.port_write(0x40, 0x10, 0); // 4096 ticks
        let d = pit.next_deadline_ns().unwrap();
        assert!(!pit.poll(d - 1));
        assert!(pit.poll(d));
        assert!(!pit.poll(d));
    }

    #[test]
    fn latch_returns_a_stable_count() {
        let mut pit = Pit::new();
        pit.port_write(0x43, 0x34, 0);
        pit.port_write(0x40, 0xff, 0);
        pit.port_write(0x40, 0xff, 0);
        pit.port_write(0x43, 0x00, 1_000_000); // latch channel 0
        let expect = 0xffff - ns_to_ticks(1_000_000) as u16;
        pit.port_write(0x43, 0x00, 2_000_000); // ignored: already latched
        assert_eq!(read16(&mut pit, 0x40, 5_000_000), expect);
        // After the latch is read, reads are live again.
        let live = read16(&mut pit, 0x40, 5_000_000);
        assert_eq!(live, 0xffff - ns_to_ticks(5_000_000) as u16);
    }

    #[test]
    fn mode0_on_channel_2_as_linux_calibrates() {
        let mut pit = Pit::new();
        let now = 1000;
        // Gate high, speaker off; channel 2, lobyte/hibyte, mode 0, latch = 11931 (10 ms).
        let v = pit.port_read(0x61, now);
        pit.port_write(0x61, (v & !0x02) | 0x01, now);
        pit.port_write(0x43, 0xb0, now);
        pit.port_write(0x42, (11931 & 0xff) as u8, now);
        pit.port_write(0x42, (11931 >> 8) as u8, now);
        assert_eq!(
            pit.port_read(0x61, now) & 0x20,
            0,
            "output low while counting"
        );
        assert_eq!(pit.port_read(0x61, now + 9_000_000) & 0x20, 0);
        assert_ne!(
            pit.port_read(0x61, now + 10_000_000) & 0x20,
            0,
            "terminal count"
        );
        assert_eq!(pit.port_read(0x61, now) & 1, 1);
    }

    #[test]
    fn gate_low_pauses_mode0() {
        let mut pit = Pit::new();
        pit.port_write(0x61, 0x01, 0);
        pit.port_write(0x43, 0xb0, 0);
        pit.port_write(0x42, 0x00, 0);
        pit.port_write(0x42, 0x10, 0); // 4096
        let t1 = ticks_to_ns_ceil(1000);
        pit.port_write(0x61, 0x00, t1);
        let frozen = read16(&mut pit, 0x42, t1);
        assert_eq!(read16(&mut pit, 0x42, t1 + 1_000_000), frozen);
        pit.port_write(0x61, 0x01, t1 + 1_000_000);
        assert_eq!(read16(&mut pit, 0x42, t1 + 1_000_000), frozen);
        assert!(read16(&mut pit, 0x42, t1 + 2_000_000) < frozen);
    }

    #[test]
    fn mode3_square_wave() {
        let mut pit = Pit::new();
        pit.port_write(0x43, 0x36, 0);
        pit.port_write(0x40, 100, 0);
        pit.port_write(0x40, 0, 0);
        assert!(pit.output(0, ticks_to_ns_ceil(49)));
        assert!(!pit.output(0, ticks_to_ns_ceil(50)));
        assert!(pit.output(0, ticks_to_ns_ceil(100)));
        assert!(pit.poll(ticks_to_ns_ceil(100)));
    }

    #[test]
    fn read_back_status_and_count() {
        let mut pit = Pit::new();
        pit.port_write(0x43, 0x34, 0);
        pit.port_write(0x43, 0xe2, 0); // read back the status of channel 0
        assert_eq!(
            pit.port_read(0x40, 0),
            0x80 | 0x40 | 0x34,
            "out high, null count, lohi, mode 2"
        );
        pit.port_write(0x40, 0x34, 0);
        pit.port_write(0x40, 0x12, 0);
        pit.port_write(0x43, 0xc2, 0); // read back count and status
        assert_eq!(pit.port_read(0x40, 10), 0x80 | 0x34);
        assert_eq!(read16(&mut pit, 0x40, 100_000), 0x1234);
    }

    #[test]
    fn lobyte_only_access() {
        let mut pit = Pit::new();
        pit.port_write(0x43, 0x10, 0); // channel 0, lobyte, mode 0
        pit.port_write(0x40, 200, 0);
        assert_eq!(pit.port_read(0x40, 0), 200);
        assert_eq!(pit.port_read(0x40, ticks_to_ns_ceil(50)), 150);
    }

    #[test]
    fn hostile_sequences_do_not_panic() {
        let mut pit = Pit::new();
        let mut now = 0u64;
        for a in 0..=255u8 {
            for port in [0x40u16, 0x41, 0x42, 0x43, 0x61, 0x44] {
                now = now.wrapping_add(12_345);
                pit.port_write(port, a, now);
                pit.port_write(port, a.wrapping_mul(7), now);
                let _ = pit.port_read(port, now);
                let _ = pit.poll(now);
                let _ = pit.next_deadline_ns();
            }
        }
        let _ = pit.port_read(0x40, u64::MAX);
        let _ = pit.poll(u64::MAX);
        let _ = pit.next_deadline_ns();
        let copy = Pit::from_state(pit.state());
        assert_eq!(copy.state(), pit.state());
    }
}
