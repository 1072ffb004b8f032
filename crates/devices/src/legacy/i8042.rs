//! The i8042 keyboard controller, reduced to what a Linux guest probes, what resets the
//! machine, and a PS/2 keyboard through which the VMM asks the guest to shut down: it types
//! Ctrl-Alt-Del ([`I8042::send_ctrl_alt_del`]).
//!
//! Controller: the self-test and interface tests pass, the command byte reads back what was
//! written, `0xfe` on the command port resets the machine. The commands that take a data byte
//! for something other than the keyboard (`0xd1` output port, `0xd2` write the keyboard's output,
//! `0xd3` AUX loopback, `0xd4` write to the AUX device) consume it; only `0xd2` does anything with
//! it. There is no AUX (mouse) device, and the AUX loopback is not answered. The status register
//! reads output-buffer-full (bit 0), the system flag (bit 2, from the command byte) and
//! "keyboard not inhibited" (bit 4). Power-on command byte: scancode translation on, keyboard
//! interrupt off (no firmware ran to turn it on; the guest's driver does), system flag set.
//!
//! Keyboard: with [`I8042::with_keyboard`], a PS/2 keyboard (see [`keyboard`] for its
//! protocol) sits on the first port. Data-port writes go to it and its answers queue up
//! (at most [`KEYBOARD_BUFFER_LEN`] bytes) for the output buffer, which takes the next one when
//! it is empty and the keyboard interface is enabled (command byte bit 4 clear). Each keyboard
//! byte entering the output buffer raises the keyboard interrupt once, if the command byte
//! enables it (bit 0). Controller responses go before queued keyboard bytes. With translation
//! on (command byte bit 6) the controller turns the keyboard's set 2 codes into set 1 codes, as
//! PCs do; the translation covers the bytes this keyboard sends. Without a keyboard
//! ([`I8042::new`]) data for it is dropped, as if none were plugged in.
//!
//! The device sits at [`I8042_DATA_PORT`] with length [`I8042_PORT_LEN`], so it also receives
//! ports `0x61..=0x63`: reads of them return `0xff` and writes are ignored.

mod keyboard;

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use crate::{BusDevice, GuestEvent, GuestEventSink, InterruptLine, StateError};
use keyboard::{Key, Keyboard, MAX_CODE_LEN};

/// The data port: responses are read here, command parameters written here.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The status (read) and command (write) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Length of the one bus range covering both ports, starting at [`I8042_DATA_PORT`].
pub const I8042_PORT_LEN: u64 = 5;
/// The command that pulses the CPU reset line.
pub const I8042_CMD_RESET_CPU: u8 = 0xfe;
/// The ISA IRQ (and GSI) of the keyboard port.
pub const I8042_KEYBOARD_IRQ: u32 = 1;
/// How many bytes the keyboard holds for the controller, as a real keyboard's buffer does.
pub const KEYBOARD_BUFFER_LEN: usize = 16;

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
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;

// Responses.
const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_TEST_PASSED: u8 = 0x00;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_NOT_INHIBITED: u8 = 0x10;

// Controller command byte ("CTR") bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;
/// After power-on: scancode translation, POST passed; interrupts stay off until the guest's
/// driver turns them on (there is no firmware to have done it).
const CTR_INITIAL: u8 = CTR_SYSTEM_FLAG | CTR_TRANSLATE;

/// Why the VMM could not type on the keyboard.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum I8042Error {
    /// The controller was built without a keyboard ([`I8042::new`]).
    #[error("the i8042 has no keyboard")]
    NoKeyboard,
    /// The guest has disabled the keyboard (or its driver has not enabled it yet): a real
    /// keyboard does not report keys then either.
    #[error("the guest has not enabled its keyboard")]
    KeyboardDisabled,
    /// The keyboard's buffer has no room for the keys: the guest is not reading it.
    #[error("the keyboard buffer is full: the guest is not reading its keyboard")]
    BufferFull,
}

/// The i8042 controller. See the [module documentation](self).
pub struct I8042 {
    events: Arc<dyn GuestEventSink>,
    /// The controller command byte.
    control: u8,
    /// The byte waiting on the data port.
    output: Option<u8>,
    /// The last command was [`CMD_WRITE_CTR`]: the next data-port write is the new command byte.
    awaiting_ctr: bool,
    /// The keyboard and what the controller keeps for it; `None` without a keyboard.
    port: Option<KeyboardPort>,
}

/// The keyboard behind the first port, its interrupt and its bytes on their way to the guest.
struct KeyboardPort {
    irq: Arc<dyn InterruptLine>,
    keyboard: Keyboard,
    /// Bytes from the keyboard (already translated) waiting for the output buffer.
    queue: VecDeque<u8>,
    /// The byte in the output buffer came from the keyboard.
    output_from_keyboard: bool,
    /// The keyboard interrupt was raised for the byte in the output buffer.
    irq_raised: bool,
    /// A controller command (`0xd1..=0xd4`) waits for its data byte.
    awaiting_data: Option<u8>,
    /// A failure to raise the interrupt was logged (once is enough).
    irq_failure_logged: bool,
}

impl KeyboardPort {
    /// How many more bytes the keyboard can hold: its buffer counts the one in the
    /// controller's output buffer too.
    fn room(&self) -> usize {
        KEYBOARD_BUFFER_LEN
            .saturating_sub(self.queue.len())
            .saturating_sub(usize::from(self.output_from_keyboard))
    }
}

/// An [`I8042`]'s registers, as a snapshot stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    pub control: u8,
    pub output: Option<u8>,
    pub awaiting_ctr: bool,
}

/// The keyboard's state and the controller's state kept for it: what [`I8042State`] leaves
/// out. Its [`Default`] is a keyboard just powered on with nothing queued (what a snapshot
/// taken without this state restores to).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042KeyboardState {
    /// Keyboard bytes waiting for the output buffer, oldest first.
    pub queue: Vec<u8>,
    /// The byte in the output buffer came from the keyboard.
    pub output_from_keyboard: bool,
    /// The keyboard interrupt was raised for it.
    pub irq_raised: bool,
    /// The controller command waiting for its data byte.
    pub awaiting_data: Option<u8>,
    /// Key presses are reported.
    pub scanning: bool,
    /// Scancode set, 1 to 3.
    pub scancode_set: u8,
    pub leds: u8,
    pub typematic: u8,
    /// The keyboard command waiting for its parameter byte.
    pub pending_command: Option<u8>,
    /// The last byte the keyboard sent.
    pub last_sent: u8,
}

impl Default for I8042KeyboardState {
    fn default() -> Self {
        I8042KeyboardState::of_keyboard(&Keyboard::default())
    }
}

impl I8042KeyboardState {
    /// The keyboard's own part of the state; the controller's side of the port idle.
    fn of_keyboard(k: &Keyboard) -> Self {
        I8042KeyboardState {
            queue: Vec::new(),
            output_from_keyboard: false,
            irq_raised: false,
            awaiting_data: None,
            scanning: k.scanning,
            scancode_set: k.set,
            leds: k.leds,
            typematic: k.typematic,
            pending_command: k.pending,
            last_sent: k.last_sent,
        }
    }
}

impl I8042 {
    /// A controller without a keyboard that reports resets to `events`.
    pub fn new(events: Arc<dyn GuestEventSink>) -> Self {
        I8042 {
            events,
            control: CTR_INITIAL,
            output: None,
            awaiting_ctr: false,
            port: None,
        }
    }

    /// A controller with a PS/2 keyboard that raises `irq` (the I/O APIC's pin
    /// [`I8042_KEYBOARD_IRQ`]) and reports resets to `events`.
    pub fn with_keyboard(events: Arc<dyn GuestEventSink>, irq: Arc<dyn InterruptLine>) -> Self {
        I8042 {
            port: Some(KeyboardPort {
                irq,
                keyboard: Keyboard::default(),
                queue: VecDeque::with_capacity(KEYBOARD_BUFFER_LEN),
                output_from_keyboard: false,
                irq_raised: false,
                awaiting_data: None,
                irq_failure_logged: false,
            }),
            ..I8042::new(events)
        }
    }

    /// Types Ctrl-Alt-Del: left Ctrl, left Alt and Delete go down in that order and come up in
    /// the reverse order. Linux turns it into SIGINT for its init process (once init has set
    /// `/proc/sys/kernel/ctrl-alt-del` to 0; before that the kernel reboots at once).
    ///
    /// Fails, and queues nothing, without a keyboard, while the keyboard is disabled (the
    /// guest has no keyboard driver, or it is not done probing), or if the keyboard's buffer
    /// cannot take the bytes of all six key events (8 bytes in set 1).
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        self.type_keys(&[Key::LeftCtrl, Key::LeftAlt, Key::Delete])
    }

    /// Presses `keys` in order, then releases them in the reverse order.
    fn type_keys(&mut self, keys: &[Key]) -> Result<(), I8042Error> {
        let translate = self.control & CTR_TRANSLATE != 0;
        let port = self.port.as_mut().ok_or(I8042Error::NoKeyboard)?;
        if !port.keyboard.scanning {
            return Err(I8042Error::KeyboardDisabled);
        }
        let room = port.room();
        let mut codes = [0u8; KEYBOARD_BUFFER_LEN];
        let mut len = 0;
        let events = keys
            .iter()
            .map(|&k| (k, true))
            .chain(keys.iter().rev().map(|&k| (k, false)));
        for (key, make) in events {
            let mut raw = [0u8; MAX_CODE_LEN];
            let n = port.keyboard.scancodes(key, make, &mut raw);
            let mut code = [0u8; MAX_CODE_LEN];
            let n = translated(&raw[..n], translate, &mut code);
            if len + n > room {
                return Err(I8042Error::BufferFull);
            }
            codes[len..len + n].copy_from_slice(&code[..n]);
            len += n;
        }
        port.queue.extend(&codes[..len]);
        self.service();
        Ok(())
    }

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

    /// The keyboard's state, for a snapshot ([`Default`] without a keyboard).
    pub fn save_keyboard_state(&self) -> I8042KeyboardState {
        let Some(port) = &self.port else {
            return I8042KeyboardState::default();
        };
        I8042KeyboardState {
            queue: port.queue.iter().copied().collect(),
            output_from_keyboard: port.output_from_keyboard,
            irq_raised: port.irq_raised,
            awaiting_data: port.awaiting_data,
            ..I8042KeyboardState::of_keyboard(&port.keyboard)
        }
    }

    /// Puts back what [`save_keyboard_state`](I8042::save_keyboard_state) returned, after
    /// [`restore_state`](I8042::restore_state). Without a keyboard there is nothing to restore.
    pub fn restore_keyboard_state(&mut self, s: &I8042KeyboardState) -> Result<(), StateError> {
        let Some(port) = &mut self.port else {
            return Ok(());
        };
        let bad = |why: &str| Err(StateError::new("i8042 keyboard", why));
        if s.queue.len() > KEYBOARD_BUFFER_LEN {
            return bad(&format!(
                "{} queued bytes, more than the keyboard's {KEYBOARD_BUFFER_LEN}",
                s.queue.len()
            ));
        }
        if s.awaiting_data.is_some_and(|c| !takes_data(c)) {
            return bad("the controller waits for data for a command that takes none");
        }
        let keyboard = Keyboard {
            scanning: s.scanning,
            set: s.scancode_set,
            leds: s.leds,
            typematic: s.typematic,
            pending: s.pending_command,
            last_sent: s.last_sent,
        };
        if !keyboard.is_valid() {
            return bad("invalid scancode set, LED bits or pending command");
        }
        port.keyboard = keyboard;
        port.queue.clear();
        port.queue.extend(&s.queue);
        port.output_from_keyboard = s.output_from_keyboard && self.output.is_some();
        port.irq_raised = s.irq_raised;
        port.awaiting_data = s.awaiting_data;
        Ok(())
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_NOT_INHIBITED;
        if self.control & CTR_SYSTEM_FLAG != 0 {
            status |= STATUS_SYSTEM_FLAG;
        }
        if self.output.is_some() {
            status |= STATUS_OUTPUT_FULL;
        }
        status
    }

    /// Puts a controller response in the output buffer, ahead of any keyboard byte there.
    fn respond(&mut self, value: u8) {
        if let Some(port) = &mut self.port {
            if std::mem::take(&mut port.output_from_keyboard) {
                if let Some(byte) = self.output {
                    port.queue.push_front(byte);
                }
            }
            port.irq_raised = false;
        }
        self.output = Some(value);
    }

    fn command(&mut self, cmd: u8) {
        self.awaiting_ctr = false;
        if let Some(port) = &mut self.port {
            port.awaiting_data = None;
        }
        match cmd {
            CMD_READ_CTR => self.respond(self.control),
            CMD_WRITE_CTR => self.awaiting_ctr = true,
            CMD_DISABLE_AUX => self.control |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.control &= !CTR_AUX_DISABLED,
            CMD_DISABLE_KBD => self.control |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => self.control &= !CTR_KBD_DISABLED,
            CMD_SELF_TEST => self.respond(SELF_TEST_PASSED),
            CMD_TEST_AUX | CMD_TEST_KBD => self.respond(INTERFACE_TEST_PASSED),
            cmd if takes_data(cmd) => {
                if let Some(port) = &mut self.port {
                    port.awaiting_data = Some(cmd);
                }
            }
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
            return;
        }
        let translate = self.control & CTR_TRANSLATE != 0;
        let Some(port) = &mut self.port else {
            tracing::trace!(value, "i8042: data for absent keyboard dropped");
            return;
        };
        match port.awaiting_data.take() {
            Some(CMD_WRITE_KBD_OUTPUT) => {
                // As if the keyboard had sent it, past the translation.
                if let Some(byte) = self.output.take().filter(|_| port.output_from_keyboard) {
                    port.queue.push_front(byte);
                }
                self.output = Some(value);
                port.output_from_keyboard = true;
                port.irq_raised = false;
            }
            Some(cmd) => tracing::trace!(cmd, value, "i8042: data for absent device dropped"),
            None => {
                let reply = port.keyboard.receive(value);
                if reply.discard_pending {
                    port.queue.clear();
                }
                let mut bytes = [0u8; MAX_CODE_LEN];
                let n = translated(reply.bytes(), translate, &mut bytes);
                let room = port.room();
                port.queue.extend(bytes[..n].iter().take(room));
            }
        }
    }

    /// Moves the next keyboard byte into an empty output buffer and raises the keyboard
    /// interrupt for a keyboard byte there, once, if the command byte allows both.
    fn service(&mut self) {
        let Some(port) = &mut self.port else {
            return;
        };
        if self.output.is_none() && self.control & CTR_KBD_DISABLED == 0 {
            if let Some(byte) = port.queue.pop_front() {
                self.output = Some(byte);
                port.output_from_keyboard = true;
                port.irq_raised = false;
            }
        }
        let interrupt = self.output.is_some()
            && port.output_from_keyboard
            && !port.irq_raised
            && self.control & CTR_KBD_INT != 0;
        if interrupt {
            port.irq_raised = true;
            if let Err(e) = port.irq.trigger() {
                if !std::mem::replace(&mut port.irq_failure_logged, true) {
                    tracing::warn!("i8042: cannot raise the keyboard interrupt: {e}");
                }
            }
        }
    }
}

/// Whether controller command `cmd` takes a data byte that is not for the keyboard.
fn takes_data(cmd: u8) -> bool {
    matches!(
        cmd,
        CMD_WRITE_OUTPUT_PORT | CMD_WRITE_KBD_OUTPUT | CMD_WRITE_AUX_OUTPUT | CMD_WRITE_AUX
    )
}

/// Bytes from the keyboard as the guest reads them: with `translate`, set 2 codes become set 1
/// codes (an `0xf0` break prefix disappears and sets bit 7 of the code after it), as the
/// i8042's translation does. Covers what the keyboard sends: its answers and the codes of the
/// keys in [`Key`]; other bytes below `0x80` do not occur and pass unchanged. Returns how many
/// bytes it wrote to `out` (never more than `bytes.len()`).
fn translated(bytes: &[u8], translate: bool, out: &mut [u8; MAX_CODE_LEN]) -> usize {
    if !translate {
        out[..bytes.len()].copy_from_slice(bytes);
        return bytes.len();
    }
    let mut len = 0;
    let mut release = 0;
    for &b in bytes {
        if b == keyboard::BREAK {
            release = 0x80;
            continue;
        }
        let code = match b {
            // Scancode set numbers (the answer to 0xf0 0x00).
            0x01 => 0x43,
            0x02 => 0x41,
            0x03 => 0x3f,
            // Left Alt, left Ctrl, Delete (after 0xe0).
            0x11 => 0x38,
            0x14 => 0x1d,
            0x71 => 0x53,
            // The second ID byte.
            0x83 => 0x41,
            other => other,
        };
        out[len] = code | std::mem::take(&mut release);
        len += 1;
    }
    len
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => {
                let value = self.output.take().unwrap_or(0);
                if let Some(port) = &mut self.port {
                    port.output_from_keyboard = false;
                    port.irq_raised = false;
                }
                self.service();
                value
            }
            (COMMAND_OFFSET, 1) => self.status(),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA_OFFSET, &[value]) => self.write_data(value),
            (COMMAND_OFFSET, &[cmd]) => self.command(cmd),
            _ => {
                tracing::trace!(offset, len = data.len(), "i8042: write ignored");
                return;
            }
        }
        self.service();
    }
}

impl fmt::Debug for I8042 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("I8042")
            .field("control", &self.control)
            .field("output", &self.output)
            .field("awaiting_ctr", &self.awaiting_ctr)
            .field("keyboard", &self.port.as_ref().map(|p| &p.keyboard))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
