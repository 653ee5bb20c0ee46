//! File descriptors as a resource the proxy can run out of: telling exhaustion apart from other
//! I/O errors, and one fd held in reserve so that a client can still be refused with a message
//! when the process has none left.

use std::sync::{Arc, Mutex};

/// Whether an I/O error means this process (EMFILE) or the system (ENFILE) has no fd left.
pub(crate) fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// One fd held back so that a client can still be told "no" when the process runs out (the
/// accept-EMFILE trick of libev and Node): the fd is freed for one refusal and taken back once
/// that client's socket is closed. Refusals overlap only if an fd frees up in between.
pub(crate) struct FdReserve {
    slot: Arc<Mutex<Option<std::fs::File>>>,
}

/// The reserve, handed to one refusal.
pub(crate) struct Reserved {
    slot: Arc<Mutex<Option<std::fs::File>>>,
}

impl FdReserve {
    pub(crate) fn new() -> Self {
        Self {
            slot: Arc::new(Mutex::new(open_reserve())),
        }
    }

    /// The reserve for one refusal, if an fd is held: the one kept open, or, while another
    /// refusal has it (or it could not be reopened after one), a new one opened here.
    pub(crate) fn take(&mut self) -> Option<Reserved> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = open_reserve();
        }
        slot.is_some().then(|| Reserved {
            slot: Arc::clone(&self.slot),
        })
    }
}

impl Reserved {
    /// Closes the reserve fd, so that the next accept can have its number.
    pub(crate) fn release(&self) {
        drop(self.slot.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Takes an fd back once the refused client's socket is closed; if another connection got
    /// there first, `FdReserve::take` tries again at the next EMFILE.
    pub(crate) fn refill(self) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        // Another refusal may have refilled it already: opening a second one and dropping the
        // first would cost an fd, and failing to open would leave none held.
        if slot.is_none() {
            *slot = open_reserve();
        }
    }
}

fn open_reserve() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Lifts the soft open-files limit to the hard one: each proxied session needs two sockets and,
/// with splice, two pipes (four fds), so the usual 1024 would cap pgwake at ~170 sessions.
pub fn raise_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn held(r: &FdReserve) -> Option<i32> {
        r.slot.lock().unwrap().as_ref().map(|f| f.as_raw_fd())
    }

    #[test]
    fn overlapping_refusals_leave_exactly_the_one_reserve_fd() {
        let mut reserve = FdReserve::new();
        let first = reserve.take().expect("an fd to hold");
        first.release();
        assert_eq!(held(&reserve), None);
        // A second refusal while the first one still has the reserve opens one of its own.
        let second = reserve.take().expect("opened anew");
        second.release();
        first.refill();
        let kept = held(&reserve).expect("refilled");
        // The second refill finds the reserve held: it keeps that fd instead of swapping it.
        second.refill();
        assert_eq!(held(&reserve), Some(kept));
    }
}
