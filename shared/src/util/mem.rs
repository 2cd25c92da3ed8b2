//! Memory estimates checked before large allocations, so a size far beyond the machine is
//! refused with a one-line message instead of an allocation abort.

use crate::error::{Error, Result};

/// Bytes this process can still allocate: `MemAvailable` from `/proc/meminfo` (Linux); `None`
/// where that is unknown.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuse a run whose estimated peak `bytes` (computed in f64, so absurd sizes cannot
/// overflow) exceeds the memory available; `what` names the flags that set the size.
pub fn check_fits(bytes: f64, what: &str) -> Result<()> {
    check_fits_in(bytes, available(), what)
}

fn check_fits_in(bytes: f64, available: Option<u64>, what: &str) -> Result<()> {
    match available {
        Some(avail) if bytes > avail as f64 => Err(Error::Usage(format!(
            "{what}: needs about {} of memory, but {} is available; hint: use smaller sizes",
            human(bytes),
            human(avail as f64)
        ))),
        _ => Ok(()),
    }
}

/// `bytes` as "1.5 GB" (powers of 1000).
pub fn human(bytes: f64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u + 1 == units.len() && v >= 1000.0 {
        return format!("{bytes:.1e} B");
    }
    format!("{v:.1} {}", units[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_only_what_does_not_fit() {
        assert!(check_fits_in(1e9, Some(2_000_000_000), "--x").is_ok());
        let e = check_fits_in(3e9, Some(2_000_000_000), "--x").unwrap_err().to_string();
        assert_eq!(e, "--x: needs about 3.0 GB of memory, but 2.0 GB is available; hint: use smaller sizes");
        assert!(check_fits_in(1e30, None, "--x").is_ok());
        assert_eq!(human(1e30), "1.0e30 B");
        assert_eq!(human(512.0), "512.0 B");
    }

    /// A given-back buffer is reused (same allocation) by a request it can hold, at the asked
    /// length; a larger request gets a new one; at most SCRATCH_KEPT are kept.
    #[test]
    fn scratch_reuses_given_back_buffers() {
        drop_scratch();
        let a = scratch(100);
        assert_eq!(a.len(), 100);
        let ptr = a.as_ptr();
        recycle(a);
        let b = scratch(60);
        assert_eq!((b.len(), b.as_ptr()), (60, ptr));
        recycle(b);
        let c = scratch(80);
        assert_eq!((c.len(), c.as_ptr()), (80, ptr), "regrown within its capacity");
        let d = scratch(1000);
        assert_eq!(d.len(), 1000);
        assert_ne!(d.as_ptr(), ptr);
        for n in 0..SCRATCH_KEPT + 20 {
            recycle(vec![0f32; n + 1]);
        }
        assert_eq!(SCRATCH.with(|s| s.borrow().len()), SCRATCH_KEPT);
        assert!(SCRATCH.with(|s| s.borrow().iter().all(|v| v.capacity() > 20)), "the largest kept");
        drop_scratch();
    }

    #[test]
    fn reads_this_machine() {
        if cfg!(target_os = "linux") {
            assert!(available().is_some_and(|b| b > 0));
        }
    }
}

thread_local! {
    /// This thread's buffers given back for [`scratch`].
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most buffers a thread keeps for [`scratch`] (a host training step keeps up to six:
/// four per-module buffers and the previous module's two weight gradients).
const SCRATCH_KEPT: usize = 8;

/// A buffer of `len` floats for a kernel that writes every element before it reads one: the
/// smallest large enough that this thread gave back with [`recycle`] (its old values left in
/// place), else a new one. A host training step makes and drops buffers of tens of MB per
/// module (pre-activations, centred inputs, reconstructions, gradients); zeroing them again
/// each time was ~2 ms of one thread per module at TinyStories-33M shape. What is kept is not
/// free for other allocations: [`drop_scratch`] before a stage allocates much else (a save).
pub fn scratch(len: usize) -> Vec<f32> {
    let kept = SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let fits = s.iter().enumerate().filter(|(_, v)| v.capacity() >= len);
        let best = fits.min_by_key(|(_, v)| v.capacity()).map(|(i, _)| i);
        best.map(|i| s.swap_remove(i))
    });
    match kept {
        Some(mut v) => {
            v.resize(len, 0.0);
            v
        }
        None => vec![0f32; len],
    }
}

/// Give `v` back for [`scratch`] on this thread (which keeps at most [`SCRATCH_KEPT`]: beyond,
/// the smallest is freed).
pub fn recycle(v: Vec<f32>) {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        s.push(v);
        if s.len() > SCRATCH_KEPT {
            let smallest = s.iter().enumerate().min_by_key(|(_, v)| v.capacity()).map(|(i, _)| i);
            if let Some(i) = smallest {
                s.swap_remove(i);
            }
        }
    });
}

/// Free the buffers kept for [`scratch`] by this thread and by every thread of rayon's pool
/// (a step run there keeps its own), e.g. before a save.
pub fn drop_scratch() {
    SCRATCH.with(|s| s.borrow_mut().clear());
    rayon::broadcast(|_| SCRATCH.with(|s| s.borrow_mut().clear()));
}

/// Keep freed memory in the process for the next allocation of the same size (glibc): the
/// passes allocate and drop buffers of tens of MB every step, which glibc by default maps and
/// unmaps each time, so every step paid the page faults of fresh pages again (at
/// TinyStories-33M shape, 2.3 M faults and a quarter of the CPU time in the kernel over six
/// finetuning steps). Requests of the threshold and more were still mapped on their own and
/// unmapped when freed: at GPT-2 small, F 24,576 a suite file's 3.4 GB of bytes, freed once its
/// tensors are made, and the engine's copy of the suite then faulted in 3.4 GB of fresh pages
/// (a host fault each on a virtual machine); with mapping off (`M_MMAP_MAX` 0) the freed bytes
/// stay in the main heap and the copy reuses them. (A worker thread's request larger than its
/// arena's 64 MB heap is still mapped: glibc does so whatever `M_MMAP_MAX` says.) Called once by
/// every tool's `main`; `util::release_freed_memory` hands free heap pages back where a stage
/// drops much for good.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before the tool allocates much.
    unsafe {
        // Requests below 1 GiB come from the heap (glibc before 2.26 caps the threshold at
        // 32 MiB: then that), a free heap top is given back only beyond 2 GiB, and no request
        // is mapped on its own by the main arena.
        if libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 0 {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        }
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_MMAP_MAX, 0);
    }
}
