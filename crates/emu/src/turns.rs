//! Deterministic scheduling of several vCPUs: one vCPU runs at a time, in vCPU-id order, for
//! a fixed number of instructions (or until it halts), and guest time is the number of
//! instructions all of them have retired plus the time skipped while idle. Every interleaving
//! of guest memory accesses, device accesses and interrupts is then fixed by the guest's own
//! execution, so the same guest with the same input runs the same way every time.
//!
//! Each vCPU keeps its own host thread: a thread waits until it is its turn, runs, and passes
//! the turn on. A vCPU keeps the turn while the VMM handles its device exits, so device
//! accesses happen in the same order too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// How long a waiting thread sleeps before looking for a stop request again.
const WAIT_SLICE: Duration = Duration::from_millis(10);

pub(crate) struct Turns {
    /// The id of the vCPU whose turn it is.
    current: Mutex<u32>,
    changed: Condvar,
    /// Instructions retired by all vCPUs: the guest clock, with the idle time.
    retired: AtomicU64,
}

impl Turns {
    pub fn new() -> Self {
        Turns {
            current: Mutex::new(0),
            changed: Condvar::new(),
            retired: AtomicU64::new(0),
        }
    }

    /// Waits for vCPU `id`'s turn. False if the thread was kicked (a stop or pause request)
    /// before its turn came.
    pub fn acquire(&self, id: u32) -> bool {
        let mut cur = self.current.lock().expect("turn lock poisoned");
        loop {
            if *cur == id {
                return true;
            }
            if hypervisor::kicked() {
                return false;
            }
            cur = self
                .changed
                .wait_timeout(cur, WAIT_SLICE)
                .expect("turn lock poisoned")
                .0;
        }
    }

    /// Gives the turn from vCPU `id` to the next of `count` vCPUs.
    pub fn pass(&self, id: u32, count: u32) {
        let mut cur = self.current.lock().expect("turn lock poisoned");
        if *cur == id {
            *cur = (id + 1) % count.max(1);
            self.changed.notify_all();
        }
    }

    /// Adds `n` retired instructions; returns the total.
    pub fn retire(&self, n: u64) -> u64 {
        self.retired.fetch_add(n, Ordering::Relaxed) + n
    }

    /// Whose turn it is and the instructions retired so far, for a snapshot (taken while no
    /// vCPU runs).
    pub fn state(&self) -> (u32, u64) {
        let cur = *self.current.lock().expect("turn lock poisoned");
        (cur, self.retired.load(Ordering::Relaxed))
    }

    /// Puts back what [`Turns::state`] returned (before any vCPU runs).
    pub fn restore(&self, current: u32, retired: u64) {
        *self.current.lock().expect("turn lock poisoned") = current;
        self.retired.store(retired, Ordering::Relaxed);
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn turns_go_round_in_id_order() {
        let turns = Arc::new(Turns::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..3u32)
            .map(|id| {
                let (turns, log) = (turns.clone(), log.clone());
                std::thread::spawn(move || {
                    for _ in 0..4 {
                        assert!(turns.acquire(id));
                        log.lock().unwrap().push(id);
                        turns.pass(id, 3);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*log.lock().unwrap(), [0, 1, 2].repeat(4));
    }

    #[test]
    fn only_the_holder_passes_the_turn() {
        let turns = Turns::new();
        turns.pass(1, 2);
        assert!(turns.acquire(0));
        turns.pass(0, 2);
        assert!(turns.acquire(1));
    }

    #[test]
    fn state_round_trips() {
        let turns = Turns::new();
        turns.retire(42);
        let other = Turns::new();
        other.restore(1, 42);
        assert_eq!(other.state(), (1, 42));
        assert_eq!(turns.state(), (0, 42));
    }

    #[test]
    fn retired_instructions_add_up() {
        let turns = Turns::new();
        assert_eq!(turns.retire(10), 10);
        assert_eq!(turns.retire(5), 15);
    }
}
