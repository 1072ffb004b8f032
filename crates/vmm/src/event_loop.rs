//! The VMM's event loop: one thread waiting with epoll on the file descriptors of the device
//! back ends (virtio queue notifications, later taps and sockets) and running each one's
//! handler when it becomes readable. Device work the guest triggers runs here, not on the
//! vCPU threads and not on a thread per request.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What runs when a registered descriptor is readable. It must consume what made it readable
/// (read the eventfd), or it runs again at once.
pub type Handler = Box<dyn FnMut() + Send>;

/// Token of the stop eventfd.
const STOP: u64 = u64::MAX;
/// Token of the pause eventfd.
const PAUSE: u64 = u64::MAX - 1;

/// The loop before it starts: descriptors and their handlers.
pub struct EventLoop {
    epoll: Epoll,
    handlers: Vec<Handler>,
    stop: EventFd,
    pause: EventFd,
    parking: Arc<Parking>,
}

/// Whether the loop should stay parked, and whether it is.
#[derive(Default)]
struct Parking {
    state: Mutex<ParkState>,
    changed: Condvar,
}

#[derive(Default)]
struct ParkState {
    requested: bool,
    parked: bool,
}

/// A running loop; stops (and joins its thread) when dropped.
pub struct RunningLoop {
    stop: EventFd,
    pause: EventFd,
    parking: Arc<Parking>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    pub fn new() -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let pause = EventFd::new(libc::EFD_NONBLOCK)?;
        for (fd, token) in [(stop.as_raw_fd(), STOP), (pause.as_raw_fd(), PAUSE)] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(EventLoop {
            epoll,
            handlers: Vec::new(),
            stop,
            pause,
            parking: Arc::default(),
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
        let pause = self.pause.try_clone()?;
        let parking = self.parking.clone();
        let thread = std::thread::Builder::new()
            .name("fv-events".into())
            .spawn(move || self.run())?;
        Ok(RunningLoop {
            stop,
            pause,
            parking,
            thread: Some(thread),
        })
    }

    /// Waits, not serving any descriptor, until the pause is lifted. Events that arrive
    /// meanwhile stay pending in their descriptors and are served after.
    fn park(&self) {
        let _ = self.pause.read();
        let mut st = self.parking.state.lock().expect("parking lock poisoned");
        if !st.requested {
            return;
        }
        st.parked = true;
        self.parking.changed.notify_all();
        while st.requested {
            st = self
                .parking
                .changed
                .wait(st)
                .expect("parking lock poisoned");
        }
        st.parked = false;
        self.parking.changed.notify_all();
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
                    STOP => return,
                    PAUSE => self.park(),
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

impl RunningLoop {
    /// Parks the loop between two handlers and returns once it is parked: no device runs
    /// until [`resume`](RunningLoop::resume), so device state and guest memory hold still.
    pub fn pause(&self) -> io::Result<()> {
        let mut st = self.parking.state.lock().expect("parking lock poisoned");
        st.requested = true;
        self.pause.write(1)?;
        while !st.parked {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return Err(io::Error::other("the device event loop has stopped"));
            }
            let (guard, _) = self
                .parking
                .changed
                .wait_timeout(st, std::time::Duration::from_millis(100))
                .expect("parking lock poisoned");
            st = guard;
        }
        Ok(())
    }

    /// Lets a paused loop serve its descriptors again.
    pub fn resume(&self) {
        let mut st = self.parking.state.lock().expect("parking lock poisoned");
        st.requested = false;
        self.parking.changed.notify_all();
    }
}

impl Drop for RunningLoop {
    fn drop(&mut self) {
        self.resume();
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

    #[test]
    fn a_paused_loop_serves_nothing_until_resumed() {
        let mut l = EventLoop::new().unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mine = evt.try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        l.add(
            evt.as_raw_fd(),
            Box::new(move || {
                tx.send(mine.read().unwrap()).unwrap();
            }),
        )
        .unwrap();
        let running = l.start().unwrap();
        running.pause().unwrap();
        evt.write(2).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        running.resume();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 2);
        // Pausing twice in a row and dropping a paused loop both work.
        running.pause().unwrap();
        running.resume();
        running.pause().unwrap();
        drop(running);
    }
}
