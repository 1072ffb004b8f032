//! The VMM's event loop: one thread waiting with epoll on the file descriptors of the device
//! back ends (virtio queue notifications, later taps and sockets) and running each one's
//! handler when it becomes readable. Device work the guest triggers runs here, not on the
//! vCPU threads and not on a thread per request.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What runs when a registered descriptor is readable. It must consume what made it readable
/// (read the eventfd), or it runs again at once.
pub type Handler = Box<dyn FnMut() + Send>;

/// The loop before it starts: descriptors and their handlers.
pub struct EventLoop {
    epoll: Epoll,
    handlers: Vec<Handler>,
    stop: EventFd,
}

/// A running loop; stops (and joins its thread) when dropped.
pub struct RunningLoop {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    pub fn new() -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, u64::MAX),
        )?;
        Ok(EventLoop {
            epoll,
            handlers: Vec::new(),
            stop,
        })
    }

    /// Runs `handler` whenever `fd` is readable. `fd` must stay open while the loop runs.
    pub fn add(&mut self, fd: RawFd, handler: Handler) -> io::Result<()> {
        let token = self.handlers.len() as u64;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
        self.handlers.push(handler);
        Ok(())
    }

    /// Starts the loop on its own thread.
    pub fn start(mut self) -> io::Result<RunningLoop> {
        let stop = self.stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("fv-events".into())
            .spawn(move || self.run())?;
        Ok(RunningLoop {
            stop,
            thread: Some(thread),
        })
    }

    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("event loop: epoll_wait failed: {e}; device I/O stops");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    u64::MAX => return,
                    token => {
                        if let Some(h) = self.handlers.get_mut(token as usize) {
                            h();
                        }
                    }
                }
            }
        }
    }
}

impl Drop for RunningLoop {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn handlers_run_when_their_event_fires_and_the_loop_stops_on_drop() {
        let mut l = EventLoop::new().unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mine = evt.try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        l.add(
            evt.as_raw_fd(),
            Box::new(move || {
                let n = mine.read().unwrap();
                tx.send(n).unwrap();
            }),
        )
        .unwrap();
        let running = l.start().unwrap();
        evt.write(3).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 3);
        drop(running);
    }
}
