//! The i8042 keyboard controller, reduced to what a Linux guest probes and what resets the
//! machine.
//!
//! No keyboard or mouse is attached and the controller raises no interrupts. Linux's i8042
//! driver finds a working controller (self-test and interface tests pass, the command byte reads
//! back what was written) and then finds no devices behind it. It also probes the AUX (mouse)
//! port and the active multiplexing mode with the AUX loopback command `0xd3`, which this
//! controller ignores, so each of those probes waits for the driver's command timeout (about
//! half a second); guests that want a fast boot pass `i8042.noaux i8042.nomux`.
//!
//! The device sits at [`I8042_DATA_PORT`] with length [`I8042_PORT_LEN`], so it also receives
//! ports `0x61..=0x63`: reads of them return `0xff` and writes are ignored.

use std::fmt;
use std::sync::Arc;

use crate::{BusDevice, GuestEvent, GuestEventSink};

/// The data port: responses are read here, command parameters written here.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The status (read) and command (write) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Length of the one bus range covering both ports, starting at [`I8042_DATA_PORT`].
pub const I8042_PORT_LEN: u64 = 5;
/// The command that pulses the CPU reset line.
pub const I8042_CMD_RESET_CPU: u8 = 0xfe;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = (I8042_COMMAND_PORT - I8042_DATA_PORT) as u64;

// Controller commands (written to the command port).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;

// Responses.
const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_TEST_PASSED: u8 = 0x00;

// Status register: output buffer full (a byte waits on the data port).
const STATUS_OUTPUT_FULL: u8 = 0x01;

// Controller command byte ("CTR") bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;
/// What firmware typically leaves behind: keyboard enabled with interrupts and scancode
/// translation, POST passed.
const CTR_INITIAL: u8 = CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_TRANSLATE;

/// The i8042 controller. See the [module documentation](self).
pub struct I8042 {
    events: Arc<dyn GuestEventSink>,
    /// The controller command byte.
    control: u8,
    /// The response byte waiting on the data port.
    output: Option<u8>,
    /// The last command was [`CMD_WRITE_CTR`]: the next data-port write is the new command byte.
    awaiting_ctr: bool,
}

/// An [`I8042`]'s registers, as a snapshot stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    pub control: u8,
    pub output: Option<u8>,
    pub awaiting_ctr: bool,
}

impl I8042 {
    /// The controller's registers, for a snapshot.
    pub fn save_state(&self) -> I8042State {
        I8042State {
            control: self.control,
            output: self.output,
            awaiting_ctr: self.awaiting_ctr,
        }
    }

    /// Puts back what [`save_state`](I8042::save_state) returned.
    pub fn restore_state(&mut self, state: &I8042State) {
        self.control = state.control;
        self.output = state.output;
        self.awaiting_ctr = state.awaiting_ctr;
    }

    /// A controller that reports resets to `events`.
    pub fn new(events: Arc<dyn GuestEventSink>) -> Self {
        I8042 {
            events,
            control: CTR_INITIAL,
            output: None,
            awaiting_ctr: false,
        }
    }

    fn status(&self) -> u8 {
        if self.output.is_some() {
            STATUS_OUTPUT_FULL
        } else {
            0
        }
    }

    fn command(&mut self, cmd: u8) {
        self.awaiting_ctr = false;
        match cmd {
            CMD_READ_CTR => self.output = Some(self.control),
            CMD_WRITE_CTR => self.awaiting_ctr = true,
            CMD_DISABLE_AUX => self.control |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.control &= !CTR_AUX_DISABLED,
            CMD_DISABLE_KBD => self.control |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => self.control &= !CTR_KBD_DISABLED,
            CMD_SELF_TEST => self.output = Some(SELF_TEST_PASSED),
            CMD_TEST_AUX | CMD_TEST_KBD => self.output = Some(INTERFACE_TEST_PASSED),
            I8042_CMD_RESET_CPU => {
                tracing::debug!("i8042: guest pulsed the reset line");
                self.events.notify(GuestEvent::Reset);
            }
            _ => tracing::debug!(cmd, "i8042: command ignored"),
        }
    }

    fn write_data(&mut self, value: u8) {
        if std::mem::take(&mut self.awaiting_ctr) {
            self.control = value;
        } else {
            // A byte for the keyboard, and there is none.
            tracing::trace!(value, "i8042: data for absent keyboard dropped");
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => self.output.take().unwrap_or(0),
            (COMMAND_OFFSET, 1) => self.status(),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA_OFFSET, &[value]) => self.write_data(value),
            (COMMAND_OFFSET, &[cmd]) => self.command(cmd),
            _ => tracing::trace!(offset, len = data.len(), "i8042: write ignored"),
        }
    }
}

impl fmt::Debug for I8042 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("I8042")
            .field("control", &self.control)
            .field("output", &self.output)
            .field("awaiting_ctr", &self.awaiting_ctr)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordingSink;

    fn i8042() -> (I8042, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        (I8042::new(sink.clone()), sink)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut data = [0u8; 1];
        dev.read(offset, &mut data);
        data[0]
    }

    /// Sends a command and returns the response, as Linux's `i8042_command` does.
    fn command(dev: &mut I8042, cmd: u8) -> Option<u8> {
        dev.write(COMMAND_OFFSET, &[cmd]);
        (read(dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL != 0).then(|| read(dev, DATA_OFFSET))
    }

    #[test]
    fn offsets_match_ports() {
        assert_eq!(COMMAND_OFFSET, 4);
        assert_eq!(
            u64::from(I8042_DATA_PORT) + I8042_PORT_LEN - 1,
            u64::from(I8042_COMMAND_PORT)
        );
    }

    #[test]
    fn status_is_zero_when_idle() {
        let (mut dev, _) = i8042();
        assert_eq!(read(&mut dev, COMMAND_OFFSET), 0);
    }

    #[test]
    fn reset_command_notifies_reset() {
        let (mut dev, sink) = i8042();
        assert_eq!(command(&mut dev, I8042_CMD_RESET_CPU), None);
        assert_eq!(sink.events(), vec![GuestEvent::Reset]);
    }

    #[test]
    fn self_test_answers_0x55_once() {
        let (mut dev, sink) = i8042();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, COMMAND_OFFSET), STATUS_OUTPUT_FULL);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x55);
        assert_eq!(read(&mut dev, COMMAND_OFFSET), 0, "response consumed");
        assert!(sink.events().is_empty());
    }

    #[test]
    fn interface_tests_pass() {
        let (mut dev, _) = i8042();
        assert_eq!(command(&mut dev, CMD_TEST_KBD), Some(0x00));
        assert_eq!(command(&mut dev, CMD_TEST_AUX), Some(0x00));
    }

    #[test]
    fn command_byte_round_trips() {
        let (mut dev, _) = i8042();
        assert_eq!(command(&mut dev, CMD_READ_CTR), Some(CTR_INITIAL));
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x56]);
        assert_eq!(command(&mut dev, CMD_READ_CTR), Some(0x56));
        // A data write not preceded by 0x60 goes to the (absent) keyboard.
        dev.write(DATA_OFFSET, &[0x11]);
        assert_eq!(command(&mut dev, CMD_READ_CTR), Some(0x56));
    }

    #[test]
    fn port_enable_and_disable_update_command_byte() {
        let (mut dev, _) = i8042();
        command(&mut dev, CMD_DISABLE_KBD);
        command(&mut dev, CMD_DISABLE_AUX);
        let ctr = command(&mut dev, CMD_READ_CTR).unwrap();
        assert_eq!(ctr & (CTR_KBD_DISABLED | CTR_AUX_DISABLED), 0x30);
        command(&mut dev, CMD_ENABLE_KBD);
        command(&mut dev, CMD_ENABLE_AUX);
        let ctr = command(&mut dev, CMD_READ_CTR).unwrap();
        assert_eq!(ctr & (CTR_KBD_DISABLED | CTR_AUX_DISABLED), 0);
    }

    #[test]
    fn unknown_commands_are_ignored() {
        let (mut dev, sink) = i8042();
        // AUX loopback with its parameter: no response, command byte untouched.
        assert_eq!(command(&mut dev, 0xd3), None);
        dev.write(DATA_OFFSET, &[0x5a]);
        assert_eq!(read(&mut dev, COMMAND_OFFSET), 0);
        assert_eq!(command(&mut dev, CMD_READ_CTR), Some(CTR_INITIAL));
        // A command between 0x60 and its parameter cancels the write.
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(COMMAND_OFFSET, &[0xd3]);
        dev.write(DATA_OFFSET, &[0x00]);
        assert_eq!(command(&mut dev, CMD_READ_CTR), Some(CTR_INITIAL));
        assert!(sink.events().is_empty());
    }

    #[test]
    fn other_ports_and_sizes_read_all_ones() {
        let (mut dev, sink) = i8042();
        assert_eq!(read(&mut dev, 1), 0xff);
        let mut wide = [0u8; 2];
        dev.read(COMMAND_OFFSET, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        dev.write(COMMAND_OFFSET, &[I8042_CMD_RESET_CPU, 0]);
        dev.write(1, &[I8042_CMD_RESET_CPU]);
        assert!(sink.events().is_empty());
    }
}
