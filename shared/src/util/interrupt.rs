//! Stopping a long run cleanly: after [`install`], the first Ctrl-C (SIGINT) or SIGTERM (what
//! Slurm sends at a time limit) only sets a flag that a training loop reads at each step
//! boundary ([`requested`]), so that it can write a checkpoint and say how to continue; a
//! second one ends the process at once (exit 130).

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether a stop was asked for since [`install`].
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

#[cfg(unix)]
extern "C" fn on_signal(_: libc::c_int) {
    // Only async-signal-safe calls here: an atomic swap, write(2) and _exit(2).
    if REQUESTED.swap(true, Ordering::SeqCst) {
        unsafe { libc::_exit(130) };
    }
    let msg = b"\nstopping after the current step (again to abort at once)\n";
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

/// Route SIGINT and SIGTERM to the flag (idempotent).
pub fn install() {
    #[cfg(unix)]
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
}
