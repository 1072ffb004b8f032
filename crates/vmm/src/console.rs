//! The serial console on the user's terminal: stdin → guest, with QEMU's Ctrl-A escapes when
//! stdin is a terminal (put in raw mode for the VM's lifetime), plain bytes when it is a pipe.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use devices::legacy::serial::SerialInput;
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

/// Where console input goes: the serial port of the VM that runs now (replaced on restart),
/// with its lock-free input handle.
pub type ConsoleTarget = Arc<Mutex<Option<(Arc<Mutex<Serial>>, SerialInput)>>>;

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

/// Feeds `bytes` to the guest: queues them, then makes sure they reach the receive FIFO —
/// the guest pulls them in whenever it touches the UART; when it is idle (waiting for an
/// interrupt) this thread pushes them in. Waits until all have been taken, so typing ahead
/// cannot grow an unbounded queue.
fn deliver(target: &ConsoleTarget, bytes: &[u8]) {
    // Input typed before the VM exists waits for its serial port.
    let (serial, input) = loop {
        if let Some(t) = target.lock().expect("console target lock poisoned").clone() {
            break t;
        }
        thread::sleep(Duration::from_millis(1));
    };
    input.send(bytes);
    while input.pending() > 0 {
        if let Ok(mut s) = serial.try_lock() {
            s.pull_input();
        }
        if input.pending() == 0 {
            break;
        }
        // The FIFO is full or the vCPU holds the UART: it will pull the rest itself. A 16550
        // FIFO holds 16–64 bytes, so polling at 1 ms keeps up with typing and pasting alike.
        thread::sleep(Duration::from_millis(1));
    }
}
