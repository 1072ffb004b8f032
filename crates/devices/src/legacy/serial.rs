//! COM1: a 16550A UART, the guest's console.
//!
//! The register model is `vm-superio`'s [`vm_superio::Serial`]; this module adapts it to
//! [`BusDevice`], to our [`InterruptLine`], and to an output that may fail without hurting the
//! guest.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use vm_superio::serial::{Error as UartError, SerialEvents};
use vm_superio::Trigger;

use crate::{BusDevice, InterruptLine, StateError};

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of I/O ports a 16550A decodes (`COM1_BASE..COM1_BASE + 8`).
pub const SERIAL_PORT_LEN: u64 = 8;
/// The ISA IRQ (and, with the identity-mapped I/O APIC, the GSI) of COM1.
pub const COM1_IRQ: u32 = 4;

/// What the UART counts. Shared (`Arc`) so the VMM can read it without taking the device lock.
#[derive(Debug, Default)]
pub struct SerialMetrics {
    out_bytes: AtomicU64,
    out_lost_bytes: AtomicU64,
    interrupt_errors: AtomicU64,
}

impl SerialMetrics {
    /// Bytes the guest transmitted that reached the output.
    pub fn out_bytes(&self) -> u64 {
        self.out_bytes.load(Ordering::Relaxed)
    }

    /// Bytes the guest transmitted that were dropped because the output failed.
    pub fn out_lost_bytes(&self) -> u64 {
        self.out_lost_bytes.load(Ordering::Relaxed)
    }

    /// Interrupts the UART could not deliver because the [`InterruptLine`] failed.
    pub fn interrupt_errors(&self) -> u64 {
        self.interrupt_errors.load(Ordering::Relaxed)
    }

    /// Counts one failed interrupt; returns the new total.
    fn add_interrupt_error(&self) -> u64 {
        self.interrupt_errors.fetch_add(1, Ordering::Relaxed) + 1
    }
}

impl SerialEvents for SerialMetrics {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        self.out_bytes.fetch_add(1, Ordering::Relaxed);
    }

    fn tx_lost_byte(&self) {
        self.out_lost_bytes.fetch_add(1, Ordering::Relaxed);
    }

    fn in_buffer_empty(&self) {}
}

/// Adapts an [`InterruptLine`] to `vm-superio`'s [`Trigger`].
struct IrqTrigger(Arc<dyn InterruptLine>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

type Uart = vm_superio::Serial<IrqTrigger, Arc<SerialMetrics>, Box<dyn Write + Send>>;

/// A [`Serial`]'s registers and receive FIFO, as a snapshot stores them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// The receive FIFO (at most 64 bytes).
    pub in_buffer: Vec<u8>,
    /// A received byte that did not fit in the FIFO.
    pub held: Option<u8>,
}

/// A 16550A UART with a 64-byte receive FIFO, for COM1.
///
/// On the bus it decodes [`SERIAL_PORT_LEN`] ports with 1-byte accesses; wider accesses read
/// `0xff` and writes of them are ignored. Bytes the guest transmits go to the output given to
/// [`Serial::new`] (written and flushed one at a time); if the output fails, the byte is dropped
/// and counted in [`SerialMetrics::out_lost_bytes`], and the guest carries on.
pub struct Serial {
    uart: Uart,
    /// Input waiting to enter the receive FIFO (see [`SerialInput`]).
    input_rx: Receiver<u8>,
    input_tx: Sender<u8>,
    input_pending: Arc<AtomicUsize>,
    /// A byte taken from the channel that did not fit in the FIFO.
    held: Option<u8>,
}

/// A handle that feeds input to a [`Serial`] without taking its lock: bytes wait in a queue
/// and move into the receive FIFO whenever the guest touches the UART (or the owner calls
/// [`Serial::pull_input`]). A guest polling the line status register in a tight loop holds
/// the device lock almost all the time; a producer that had to take that lock would starve.
#[derive(Clone)]
pub struct SerialInput {
    tx: Sender<u8>,
    pending: Arc<AtomicUsize>,
}

impl SerialInput {
    /// Queues `bytes` for the guest.
    pub fn send(&self, bytes: &[u8]) {
        for &b in bytes {
            if self.tx.send(b).is_ok() {
                self.pending.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Bytes queued that have not reached the receive FIFO yet.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}

impl Serial {
    /// A UART that raises `interrupt` and writes the guest's output to `out`.
    pub fn new(interrupt: Arc<dyn InterruptLine>, out: Box<dyn Write + Send>) -> Self {
        let metrics = Arc::new(SerialMetrics::default());
        let (input_tx, input_rx) = channel();
        Serial {
            uart: vm_superio::Serial::with_events(IrqTrigger(interrupt), metrics, out),
            input_rx,
            input_tx,
            input_pending: Arc::new(AtomicUsize::new(0)),
            held: None,
        }
    }

    /// A handle to feed input without the device lock.
    pub fn input(&self) -> SerialInput {
        SerialInput {
            tx: self.input_tx.clone(),
            pending: self.input_pending.clone(),
        }
    }

    /// Moves queued input into the receive FIFO, as much as fits (raising the interrupt if the
    /// guest enabled it).
    pub fn pull_input(&mut self) {
        let mut buf = [0u8; 64];
        loop {
            let room = self.uart.fifo_capacity().min(buf.len());
            if room == 0 {
                return;
            }
            let mut n = 0;
            if let Some(b) = self.held.take() {
                buf[0] = b;
                n = 1;
            }
            while n < room {
                match self.input_rx.try_recv() {
                    Ok(b) => {
                        buf[n] = b;
                        n += 1;
                    }
                    Err(_) => break,
                }
            }
            if n == 0 {
                return;
            }
            let taken = self.enqueue_input(&buf[..n]);
            self.input_pending.fetch_sub(taken.min(n), Ordering::AcqRel);
            if taken < n {
                // Loopback mode or a full FIFO: keep the first byte that did not fit; the rest
                // of this batch is dropped only if the guest keeps the UART in loopback, as a
                // real UART would drop received bytes then.
                self.held = Some(buf[taken]);
                let dropped = n - taken - 1;
                self.input_pending.fetch_sub(dropped, Ordering::AcqRel);
                return;
            }
        }
    }

    /// Queues `bytes` for the guest to read, as many as fit in the receive FIFO, and raises the
    /// interrupt if the guest enabled it. Returns how many were queued: fewer than
    /// `bytes.len()` when the FIFO is full, and 0 while the guest has the UART in loopback mode.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let before = self.uart.fifo_capacity();
        let fitting = &bytes[..bytes.len().min(before)];
        if fitting.is_empty() {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(fitting) {
            Ok(_) => {}
            // The bytes are queued before the interrupt is raised, so they count as taken.
            Err(UartError::Trigger(e)) => self.interrupt_failed(&e),
            Err(UartError::FullFifo) | Err(UartError::IOError(_)) => {}
        }
        // Measure rather than trust the return value: this is right in every case above.
        before.saturating_sub(self.uart.fifo_capacity())
    }

    /// How many more bytes the receive FIFO can take now.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// The UART's registers and receive FIFO, for a snapshot. Input still queued outside
    /// the FIFO is not state: it belongs to the host side that typed it.
    pub fn save_state(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            held: self.held,
        }
    }

    /// Puts back what [`save_state`](Serial::save_state) returned, keeping this UART's
    /// interrupt line, counters and output.
    pub fn restore_state(&mut self, state: &SerialState) -> Result<(), StateError> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let trigger = IrqTrigger(self.uart.interrupt_evt().0.clone());
        let metrics = self.uart.events().clone();
        let out = std::mem::replace(self.uart.writer_mut(), Box::new(io::sink()));
        match Uart::from_state(&s, trigger, metrics, out) {
            Ok(uart) => {
                self.uart = uart;
                self.held = state.held;
                Ok(())
            }
            Err(e) => Err(StateError::new("serial", format!("{e:?}"))),
        }
    }

    /// The UART's counters.
    pub fn metrics(&self) -> &Arc<SerialMetrics> {
        self.uart.events()
    }

    fn interrupt_failed(&self, error: &io::Error) {
        // The first failure is worth a warning; repeating it on every byte would flood the log.
        if self.metrics().add_interrupt_error() == 1 {
            tracing::warn!("Serial: cannot raise the interrupt: {error}");
        } else {
            tracing::trace!("Serial: cannot raise the interrupt: {error}");
        }
    }

    /// The UART register addressed by `offset`, if this is an access the UART serves.
    fn register(offset: u64, len: usize) -> Option<u8> {
        if len != 1 || offset >= SERIAL_PORT_LEN {
            return None;
        }
        u8::try_from(offset).ok()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if self.input_pending.load(Ordering::Acquire) > 0 {
            self.pull_input();
        }
        match Self::register(offset, data.len()) {
            Some(reg) => data[0] = self.uart.read(reg),
            None => {
                tracing::trace!(offset, len = data.len(), "Serial: unsupported read");
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(reg) = Self::register(offset, data.len()) else {
            tracing::trace!(
                offset,
                len = data.len(),
                "Serial: unsupported write ignored"
            );
            return;
        };
        match self.uart.write(reg, data[0]) {
            Ok(()) => {}
            // Already counted by `SerialMetrics::tx_lost_byte`.
            Err(UartError::IOError(e)) => {
                if self.metrics().out_lost_bytes() == 1 {
                    tracing::warn!("Serial: output failed, dropping guest output: {e}");
                } else {
                    tracing::trace!("Serial: output failed: {e}");
                }
            }
            Err(UartError::Trigger(e)) => self.interrupt_failed(&e),
            Err(UartError::FullFifo) => {}
        }
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serial")
            .field("state", &self.uart.state())
            .field("input_pending", &self.input_pending.load(Ordering::Relaxed))
            .field("metrics", self.metrics())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::test_utils::CountingInterrupt;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const LSR_DATA_READY: u8 = 0x01;
    const MCR_LOOP: u8 = 0x10;

    /// An output the test can inspect after handing it to the UART.
    #[derive(Clone, Default)]
    struct SharedOutput(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedOutput {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct BrokenOutput;

    impl Write for BrokenOutput {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Serial, Arc<CountingInterrupt>, SharedOutput) {
        let irq = Arc::new(CountingInterrupt::default());
        let out = SharedOutput::default();
        (Serial::new(irq.clone(), Box::new(out.clone())), irq, out)
    }

    fn read(serial: &mut Serial, offset: u64) -> u8 {
        let mut data = [0u8; 1];
        serial.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let (mut serial, _, out) = serial();
        for b in b"hi\n" {
            serial.write(DATA, &[*b]);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hi\n");
        assert_eq!(serial.metrics().out_bytes(), 3);
    }

    #[test]
    fn output_failure_drops_the_byte_and_keeps_going() {
        let irq = Arc::new(CountingInterrupt::default());
        let mut serial = Serial::new(irq.clone(), Box::new(BrokenOutput));
        serial.write(IER, &[IER_THRE]);
        for b in [b'a', b'b'] {
            // Acknowledge the pending THR-empty interrupt, as the driver does, then transmit.
            read(&mut serial, IIR);
            let before = irq.count();
            serial.write(DATA, &[b]);
            // The transmitter still interrupts and looks ready, so the guest does not hang.
            assert_eq!(irq.count(), before + 1);
            assert_eq!(read(&mut serial, LSR) & 0x20, 0x20);
        }
        assert_eq!(serial.metrics().out_lost_bytes(), 2);
        assert_eq!(serial.metrics().out_bytes(), 0);
    }

    #[test]
    fn input_raises_interrupt_when_enabled() {
        let (mut serial, irq, _) = serial();
        serial.write(IER, &[IER_RDA]);
        assert_eq!(irq.count(), 0);
        assert_eq!(serial.enqueue_input(b"ab"), 2);
        assert_eq!(irq.count(), 1);
        assert_eq!(read(&mut serial, IIR) & 0x0f, 0x04, "RDA interrupt pending");
        assert_eq!(read(&mut serial, LSR) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!(read(&mut serial, DATA), b'a');
        assert_eq!(read(&mut serial, DATA), b'b');
        assert_eq!(read(&mut serial, LSR) & LSR_DATA_READY, 0);
        // Drained: new input interrupts again.
        assert_eq!(serial.enqueue_input(b"c"), 1);
        assert_eq!(irq.count(), 2);
    }

    #[test]
    fn input_does_not_interrupt_when_disabled() {
        let (mut serial, irq, _) = serial();
        assert_eq!(serial.enqueue_input(b"x"), 1);
        assert_eq!(irq.count(), 0);
        assert_eq!(read(&mut serial, LSR) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!(read(&mut serial, DATA), b'x');
    }

    #[test]
    fn input_fills_fifo_then_reports_partial_count() {
        let (mut serial, _, _) = serial();
        let capacity = serial.input_capacity();
        assert_eq!(capacity, 64);
        assert_eq!(serial.enqueue_input(&[b'x'; 60]), 60);
        assert_eq!(serial.input_capacity(), 4);
        assert_eq!(serial.enqueue_input(&[b'y'; 10]), 4);
        assert_eq!(serial.input_capacity(), 0);
        assert_eq!(serial.enqueue_input(b"z"), 0);
        assert_eq!(serial.enqueue_input(b""), 0);
        read(&mut serial, DATA);
        assert_eq!(serial.input_capacity(), 1);
    }

    #[test]
    fn input_counts_bytes_even_if_interrupt_fails() {
        let irq = Arc::new(CountingInterrupt::failing());
        let mut serial = Serial::new(irq.clone(), Box::new(io::sink()));
        serial.write(IER, &[IER_RDA]);
        assert_eq!(serial.enqueue_input(b"abc"), 3);
        assert_eq!(serial.input_capacity(), 61);
        assert!(serial.metrics().interrupt_errors() >= 1);
    }

    #[test]
    fn loopback_mode_takes_no_input() {
        let (mut serial, _, out) = serial();
        serial.write(MCR, &[MCR_LOOP]);
        assert_eq!(serial.enqueue_input(b"abc"), 0);
        serial.write(DATA, b"q");
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(read(&mut serial, DATA), b'q');
    }

    #[test]
    fn wide_accesses_read_all_ones_and_are_ignored() {
        let (mut serial, _, out) = serial();
        let mut data = [0u8; 2];
        serial.read(DATA, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        serial.write(DATA, b"ab");
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(read(&mut serial, SERIAL_PORT_LEN), 0xff);
    }

    #[test]
    fn works_through_the_bus_at_com1() {
        let (serial, _, out) = serial();
        let bus = crate::bus::Bus::new();
        bus.insert(
            Arc::new(Mutex::new(serial)),
            u64::from(COM1_BASE),
            SERIAL_PORT_LEN,
        )
        .unwrap();
        bus.write(u64::from(COM1_BASE), b"!").unwrap();
        let mut lsr = [0u8; 1];
        bus.read(u64::from(COM1_BASE) + LSR, &mut lsr).unwrap();
        assert_eq!(lsr[0] & 0x60, 0x60, "transmitter empty and idle");
        assert_eq!(*out.0.lock().unwrap(), b"!");
    }
}
