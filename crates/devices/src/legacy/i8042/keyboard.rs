//! The PS/2 keyboard behind the i8042's first port: the host-to-keyboard command protocol of an
//! IBM MF II keyboard, enough for Linux's atkbd driver to probe and configure it, and the
//! scancodes of the few keys the VMM types.
//!
//! The keyboard answers every byte the host sends at once; it hands its answers (and key
//! scancodes) to the controller, which buffers, translates and delivers them.
//!
//! | host sends | keyboard answers |
//! |---|---|
//! | `0xed` LEDs, `0xf3` typematic rate, `0xf0` scancode set | `0xfa`, then `0xfa` for the parameter; `0xf0 0x00` adds the current set (1, 2 or 3) |
//! | `0xee` echo | `0xee` |
//! | `0xf2` identify | `0xfa 0xab 0x83` |
//! | `0xf4` enable | `0xfa`; key presses are reported |
//! | `0xf5` disable | `0xfa`; defaults restored, key presses are not reported |
//! | `0xf6` defaults | `0xfa`; defaults restored, key presses are reported |
//! | `0xf7`–`0xfd` (set 3 key types) | `0xfa`, nothing changes |
//! | `0xfe` resend | the last byte it sent |
//! | `0xff` reset | `0xfa 0xaa` (self-test passed); defaults, key presses reported |
//! | anything else | `0xfe` (resend request) |
//!
//! A parameter is a byte below `0x80` following a command that takes one; a byte from `0x80`
//! up starts a new command instead. Every command but resend discards scancodes the keyboard
//! has not handed over yet (the controller does that: see [`Reply::discard_pending`]).
//! The defaults: scancode set 2, LEDs off.

/// Acknowledge: the byte was understood.
pub(super) const ACK: u8 = 0xfa;
/// Resend: the byte was not understood (as a reply), or send the last byte again (as a command).
pub(super) const RESEND: u8 = 0xfe;
/// Basic assurance test passed, after a reset.
pub(super) const BAT_PASSED: u8 = 0xaa;
/// The two identification bytes of an MF II keyboard (the controller translates the second
/// to `0x41` when it translates scancodes).
pub(super) const ID: [u8; 2] = [0xab, 0x83];
/// Extended-key prefix.
pub(super) const EXTENDED: u8 = 0xe0;
/// Break (key release) prefix in scancode sets 2 and 3.
pub(super) const BREAK: u8 = 0xf0;

pub(super) const CMD_SET_LEDS: u8 = 0xed;
pub(super) const CMD_ECHO: u8 = 0xee;
pub(super) const CMD_SCANCODE_SET: u8 = 0xf0;
pub(super) const CMD_IDENTIFY: u8 = 0xf2;
pub(super) const CMD_TYPEMATIC: u8 = 0xf3;
pub(super) const CMD_ENABLE: u8 = 0xf4;
pub(super) const CMD_DISABLE: u8 = 0xf5;
pub(super) const CMD_DEFAULTS: u8 = 0xf6;
pub(super) const CMD_RESEND: u8 = 0xfe;
pub(super) const CMD_RESET: u8 = 0xff;

/// Scancode set after power-on, reset and the defaults commands.
const DEFAULT_SET: u8 = 2;

/// A key the keyboard can report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Key {
    LeftCtrl,
    LeftAlt,
    /// The Delete key of the editing block (not the keypad's).
    Delete,
}

impl Key {
    /// Whether the key's codes carry the [`EXTENDED`] prefix, and its make code, in scancode
    /// set `set`.
    fn code(self, set: u8) -> (bool, u8) {
        match (set, self) {
            (1, Key::LeftCtrl) => (false, 0x1d),
            (1, Key::LeftAlt) => (false, 0x38),
            (1, Key::Delete) => (true, 0x53),
            (3, Key::LeftCtrl) => (false, 0x11),
            (3, Key::LeftAlt) => (false, 0x19),
            (3, Key::Delete) => (false, 0x64),
            (_, Key::LeftCtrl) => (false, 0x14),
            (_, Key::LeftAlt) => (false, 0x11),
            (_, Key::Delete) => (true, 0x71),
        }
    }
}

/// What the keyboard sends back for one byte from the host: at most three bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Reply {
    bytes: [u8; 3],
    len: usize,
    /// The byte was a command: scancodes not yet handed to the host are dropped first.
    pub(super) discard_pending: bool,
}

impl Reply {
    fn new(bytes: &[u8], discard_pending: bool) -> Reply {
        let mut r = Reply {
            discard_pending,
            ..Reply::default()
        };
        r.bytes[..bytes.len()].copy_from_slice(bytes);
        r.len = bytes.len();
        r
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Longest scancode sequence of one key event: extended prefix, break prefix, code.
pub(super) const MAX_CODE_LEN: usize = 3;

/// The keyboard's state. See the [module documentation](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Keyboard {
    /// Key presses are reported.
    pub(super) scanning: bool,
    /// Scancode set, 1 to 3.
    pub(super) set: u8,
    /// LED state: bit 0 scroll lock, 1 num lock, 2 caps lock.
    pub(super) leds: u8,
    /// Typematic rate and delay (stored, never used: keys do not repeat).
    pub(super) typematic: u8,
    /// The command waiting for its parameter byte.
    pub(super) pending: Option<u8>,
    /// The last byte the keyboard sent, for the resend command.
    pub(super) last_sent: u8,
}

impl Default for Keyboard {
    /// A keyboard after power-on: self-test passed, scanning, set 2.
    fn default() -> Self {
        Keyboard {
            scanning: true,
            set: DEFAULT_SET,
            leds: 0,
            typematic: 0,
            pending: None,
            last_sent: BAT_PASSED,
        }
    }
}

impl Keyboard {
    /// Handles one byte from the host.
    pub(super) fn receive(&mut self, byte: u8) -> Reply {
        let reply = match self.pending.take() {
            Some(cmd) if byte < 0x80 => self.parameter(cmd, byte),
            _ => self.command(byte),
        };
        if let Some(&last) = reply.bytes().last() {
            self.last_sent = last;
        }
        reply
    }

    fn command(&mut self, cmd: u8) -> Reply {
        let ack = Reply::new(&[ACK], true);
        match cmd {
            CMD_SET_LEDS | CMD_TYPEMATIC | CMD_SCANCODE_SET => {
                self.pending = Some(cmd);
                ack
            }
            CMD_ECHO => Reply::new(&[CMD_ECHO], true),
            CMD_IDENTIFY => Reply::new(&[ACK, ID[0], ID[1]], true),
            CMD_ENABLE => {
                self.scanning = true;
                ack
            }
            CMD_DISABLE => {
                self.set_defaults();
                self.scanning = false;
                ack
            }
            CMD_DEFAULTS => {
                self.set_defaults();
                self.scanning = true;
                ack
            }
            0xf7..=0xfd => ack,
            CMD_RESEND => Reply::new(&[self.last_sent], false),
            CMD_RESET => {
                self.set_defaults();
                self.scanning = true;
                Reply::new(&[ACK, BAT_PASSED], true)
            }
            _ => {
                tracing::trace!(cmd, "i8042 keyboard: unknown command");
                Reply::new(&[RESEND], true)
            }
        }
    }

    fn parameter(&mut self, cmd: u8, value: u8) -> Reply {
        match cmd {
            CMD_SET_LEDS => self.leds = value & 0x07,
            CMD_TYPEMATIC => self.typematic = value,
            CMD_SCANCODE_SET => match value {
                0 => return Reply::new(&[ACK, self.set], false),
                1..=3 => self.set = value,
                _ => tracing::trace!(value, "i8042 keyboard: unknown scancode set ignored"),
            },
            _ => {}
        }
        Reply::new(&[ACK], false)
    }

    fn set_defaults(&mut self) {
        self.set = DEFAULT_SET;
        self.leds = 0;
        self.typematic = 0;
        self.pending = None;
    }

    /// The scancodes of `key` going down (`make`) or up, in the current set, into `out`;
    /// returns how many bytes it wrote.
    pub(super) fn scancodes(&self, key: Key, make: bool, out: &mut [u8; MAX_CODE_LEN]) -> usize {
        let (extended, code) = key.code(self.set);
        let mut len = 0;
        let mut push = |b| {
            out[len] = b;
            len += 1;
        };
        if extended {
            push(EXTENDED);
        }
        match (make, self.set) {
            (true, _) => push(code),
            (false, 1) => push(code | 0x80),
            (false, _) => {
                push(BREAK);
                push(code);
            }
        }
        len
    }

    /// Whether the keyboard's state is one it could be in.
    pub(super) fn is_valid(&self) -> bool {
        (1..=3).contains(&self.set)
            && self.leds <= 0x07
            && self
                .pending
                .is_none_or(|cmd| matches!(cmd, CMD_SET_LEDS | CMD_TYPEMATIC | CMD_SCANCODE_SET))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(kbd: &mut Keyboard, bytes: &[u8]) -> Vec<u8> {
        bytes
            .iter()
            .flat_map(|&b| kbd.receive(b).bytes().to_vec())
            .collect()
    }

    fn codes(kbd: &Keyboard, key: Key, make: bool) -> Vec<u8> {
        let mut out = [0; MAX_CODE_LEN];
        let n = kbd.scancodes(key, make, &mut out);
        out[..n].to_vec()
    }

    #[test]
    fn identify_answers_mf2_id() {
        let mut kbd = Keyboard::default();
        assert_eq!(send(&mut kbd, &[CMD_IDENTIFY]), [0xfa, 0xab, 0x83]);
    }

    #[test]
    fn parameter_commands_ack_both_bytes() {
        let mut kbd = Keyboard::default();
        assert_eq!(send(&mut kbd, &[CMD_SET_LEDS, 0x07]), [ACK, ACK]);
        assert_eq!(kbd.leds, 7);
        assert_eq!(send(&mut kbd, &[CMD_TYPEMATIC, 0x00]), [ACK, ACK]);
        assert_eq!(send(&mut kbd, &[CMD_SCANCODE_SET, 0]), [ACK, ACK, 2]);
        assert_eq!(send(&mut kbd, &[CMD_SCANCODE_SET, 3]), [ACK, ACK]);
        assert_eq!(send(&mut kbd, &[CMD_SCANCODE_SET, 0]), [ACK, ACK, 3]);
        assert!(kbd.pending.is_none());
    }

    #[test]
    fn a_command_in_place_of_a_parameter_runs_as_a_command() {
        let mut kbd = Keyboard::default();
        assert_eq!(
            send(&mut kbd, &[CMD_SET_LEDS, CMD_IDENTIFY]),
            [ACK, ACK, 0xab, 0x83]
        );
        assert!(kbd.pending.is_none());
        assert_eq!(kbd.leds, 0);
    }

    #[test]
    fn enable_disable_and_defaults() {
        let mut kbd = Keyboard::default();
        send(&mut kbd, &[CMD_SCANCODE_SET, 1, CMD_SET_LEDS, 2]);
        assert_eq!(send(&mut kbd, &[CMD_DISABLE]), [ACK]);
        assert!(!kbd.scanning);
        assert_eq!((kbd.set, kbd.leds), (2, 0));
        assert_eq!(send(&mut kbd, &[CMD_ENABLE]), [ACK]);
        assert!(kbd.scanning);
        send(&mut kbd, &[CMD_DISABLE, CMD_SCANCODE_SET, 3]);
        assert_eq!(send(&mut kbd, &[CMD_DEFAULTS]), [ACK]);
        assert!(kbd.scanning);
        assert_eq!(kbd.set, 2);
    }

    #[test]
    fn reset_passes_self_test_and_resend_repeats_the_last_byte() {
        let mut kbd = Keyboard::default();
        send(&mut kbd, &[CMD_DISABLE]);
        let r = kbd.receive(CMD_RESET);
        assert_eq!(r.bytes(), [ACK, BAT_PASSED]);
        assert!(r.discard_pending);
        assert!(kbd.scanning);
        let r = kbd.receive(CMD_RESEND);
        assert_eq!(r.bytes(), [BAT_PASSED]);
        assert!(!r.discard_pending);
    }

    #[test]
    fn echo_and_unknown_commands() {
        let mut kbd = Keyboard::default();
        assert_eq!(send(&mut kbd, &[CMD_ECHO]), [CMD_ECHO]);
        // ATKBD_CMD_EX_ENABLE and stray data bytes are not understood.
        assert_eq!(send(&mut kbd, &[0xea, 0x12]), [RESEND, RESEND]);
        // Set 3 key-type commands are accepted and do nothing.
        assert_eq!(send(&mut kbd, &[0xfa]), [ACK]);
        assert_eq!(
            kbd,
            Keyboard {
                last_sent: ACK,
                ..Keyboard::default()
            }
        );
    }

    #[test]
    fn scancodes_per_set() {
        let mut kbd = Keyboard::default();
        assert_eq!(codes(&kbd, Key::LeftCtrl, true), [0x14]);
        assert_eq!(codes(&kbd, Key::LeftCtrl, false), [0xf0, 0x14]);
        assert_eq!(codes(&kbd, Key::Delete, true), [0xe0, 0x71]);
        assert_eq!(codes(&kbd, Key::Delete, false), [0xe0, 0xf0, 0x71]);
        kbd.set = 1;
        assert_eq!(codes(&kbd, Key::LeftAlt, true), [0x38]);
        assert_eq!(codes(&kbd, Key::LeftAlt, false), [0xb8]);
        assert_eq!(codes(&kbd, Key::Delete, false), [0xe0, 0xd3]);
        kbd.set = 3;
        assert_eq!(codes(&kbd, Key::Delete, true), [0x64]);
        assert_eq!(codes(&kbd, Key::LeftAlt, false), [0xf0, 0x19]);
    }

    #[test]
    fn validity() {
        assert!(Keyboard::default().is_valid());
        for bad in [
            Keyboard {
                set: 0,
                ..Keyboard::default()
            },
            Keyboard {
                set: 4,
                ..Keyboard::default()
            },
            Keyboard {
                leds: 8,
                ..Keyboard::default()
            },
            Keyboard {
                pending: Some(CMD_IDENTIFY),
                ..Keyboard::default()
            },
        ] {
            assert!(!bad.is_valid(), "{bad:?}");
        }
    }
}
