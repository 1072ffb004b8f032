//! The serial console on the user's terminal: stdin → guest, with QEMU's Ctrl-A escapes when
//! stdin is a terminal (put in raw mode for the VM's lifetime), plain bytes when it is a pipe.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use devices::legacy::Serial;

use crate::VmEvent;

const CTRL_A: u8 = 0x01;
const ESCAPE_HELP: &str =
    "\r\nC-a x    quit ferrovisor\r\nC-a h    this help\r\nC-a C-a  send C-a to the guest\r\n";

/// The terminal's settings before raw mode; restores them when dropped.
pub struct RawTerminal {
    fd: i32,
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts stdin in raw mode if it is a terminal; `None` if it is not.
    pub fn enter() -> Option<RawTerminal> {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        let mut saved = std::mem::MaybeUninit::<libc::termios>::zeroed();
        // SAFETY: tcgetattr fills the termios the pointer refers to; fd is a terminal.
        if unsafe { libc::tcgetattr(fd, saved.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: tcgetattr succeeded and initialised the struct.
        let saved = unsafe { saved.assume_init() };
        let mut raw = saved;
        // No line editing, echo, signals from keys, or input translation: every key goes to
        // the guest. Output processing stays on so host-side messages keep their line breaks.
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::IGNCR | libc::ISTRIP);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: fd is a terminal and `raw` a fully initialised termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same terminal in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Where console input goes: the serial port of the VM that runs now (replaced on restart).
pub type ConsoleTarget = Arc<Mutex<Option<Arc<Mutex<Serial>>>>>;

/// Starts the thread that copies stdin to the guest's serial port. With `escapes`, Ctrl-A x
/// asks the VMM to quit. At end of input the thread stops; the guest keeps running.
pub fn spawn_stdin_pump(
    target: ConsoleTarget,
    events: Sender<VmEvent>,
    escapes: bool,
) -> io::Result<()> {
    thread::Builder::new()
        .name("console".into())
        .spawn(move || pump(target, events, escapes))?;
    Ok(())
}

fn pump(target: ConsoleTarget, events: Sender<VmEvent>, escapes: bool) {
    let mut stdin = io::stdin().lock();
    let mut buf = [0u8; 256];
    let mut after_ctrl_a = false;
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut out = Vec::with_capacity(n);
        for &b in &buf[..n] {
            if !escapes {
                out.push(b);
            } else if after_ctrl_a {
                after_ctrl_a = false;
                match b {
                    b'x' | b'X' => {
                        let _ = events.send(VmEvent::ConsoleQuit);
                        return;
                    }
                    b'h' | b'H' | b'?' => eprint!("{ESCAPE_HELP}"),
                    CTRL_A => out.push(CTRL_A),
                    _ => {}
                }
            } else if b == CTRL_A {
                after_ctrl_a = true;
            } else {
                out.push(b);
            }
        }
        deliver(&target, &out);
    }
}

/// Feeds `bytes` to the guest as its receive FIFO drains; waits while it is full.
fn deliver(target: &ConsoleTarget, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let serial = target.lock().expect("console target lock poisoned").clone();
        let taken = match serial {
            Some(serial) => serial
                .lock()
                .expect("serial device lock poisoned")
                .enqueue_input(bytes),
            None => 0,
        };
        bytes = &bytes[taken..];
        if taken == 0 {
            // The guest has not read what it has; a 16550 FIFO holds 16–64 bytes, so polling
            // at 1 ms keeps up with typing and pasting alike.
            thread::sleep(Duration::from_millis(1));
        }
    }
}
