//! The process's allocator: the system's, with every block of a page or more aligned to a cache
//! line (64 bytes).
//!
//! glibc hands out large blocks 16 bytes past a page boundary, so every 64-byte vector load
//! from such a buffer straddles two cache lines; the sparse row sums, Adam's streams and the
//! top-k scans read their buffers (activations, gradients, parameters) with such loads. (The
//! by-feature sums at TinyStories-33M shape: ~3.7 ms on rows 16 bytes past a line, ~3.2 ms on
//! aligned rows, 2 threads.)

use std::alloc::{GlobalAlloc, Layout, System};

/// [`System`], 64-byte aligned from one page up.
pub struct LineAligned;

#[global_allocator]
static ALLOCATOR: LineAligned = LineAligned;

/// The layout asked of the system for `layout`: one function of the layout, so that a block is
/// always freed with the layout it was allocated with.
#[inline]
fn aligned(layout: Layout) -> Layout {
    if layout.size() >= 4096 && layout.align() < 64 {
        // A larger power-of-two alignment of the same size; fails only near isize::MAX, where
        // the system would refuse the block anyway.
        layout.align_to(64).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every block comes from and goes back to the system allocator with `aligned` of the
// caller's layout, which meets the caller's size and alignment.
unsafe impl GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with a layout of the same size (non-zero, the caller's contract).
        unsafe { System.alloc(aligned(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(aligned(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated with `aligned(layout)` (the caller passes its layout).
        unsafe { System.dealloc(ptr, aligned(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract (a valid new size for `layout`'s alignment).
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let (old_sys, new_sys) = (aligned(layout), aligned(new));
        if old_sys.align() == new_sys.align() {
            // SAFETY: `ptr` was allocated with `old_sys`; the new block keeps its alignment.
            return unsafe { System.realloc(ptr, old_sys, new_size) };
        }
        // Crossing the page threshold changes the alignment: a new block, the bytes, the old freed.
        // SAFETY: `new_sys` has a non-zero size; both blocks are valid for the bytes copied.
        unsafe {
            let out = System.alloc(new_sys);
            if !out.is_null() {
                std::ptr::copy_nonoverlapping(ptr, out, layout.size().min(new_size));
                System.dealloc(ptr, old_sys);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    /// Blocks of a page or more start on a cache line, through allocation, growth across the
    /// threshold and shrinking; small ones keep their own alignment; contents survive.
    #[test]
    fn large_blocks_start_on_a_cache_line() {
        for n in [1024usize, 4096, 1 << 20] {
            let v = vec![1f32; n];
            assert_eq!(v.as_ptr() as usize % 64, 0, "{n} floats");
        }
        let mut v: Vec<u8> = Vec::with_capacity(100);
        v.extend((0..100).map(|i| i as u8));
        v.reserve_exact(10_000);
        assert_eq!(v.as_ptr() as usize % 64, 0);
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u8));
        v.shrink_to(200);
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u8));
        let small = vec![7u16; 3];
        assert_eq!(small.as_ptr() as usize % 2, 0);
    }
}
