//! PC legacy devices on port I/O: the COM1 UART, the i8042 keyboard controller and the CMOS
//! real-time clock.

pub mod i8042;
pub mod rtc;
pub mod serial;

pub use i8042::I8042;
pub use rtc::Rtc;
pub use serial::{Serial, SerialMetrics};
