//! The memory allocator of the `strait` binary, and giving freed memory back to the OS after a
//! table swap.
//!
//! mimalloc rather than glibc's malloc: tables of thousands of routes are built and freed
//! whole on every change, and glibc spends most of a rebuild consolidating and unlinking free
//! chunks while its arenas keep the freed memory (measured in docs/performance.md). Built
//! with `no_thp`: mimalloc otherwise asks for transparent huge pages on its arenas, and the
//! 2 MiB pages made an idle process resident at 20 MiB instead of 11.
//!
//! mimalloc returns freed pages to the OS only when later allocator activity finds them
//! older than its purge delay (1 s). A rebuilt table frees the previous one in one go and
//! then the control plane goes quiet, so those pages stayed resident: 88 MiB instead of 54
//! with the 5,000-Service benchmark. A shorter purge delay fixes that too but costs 3% of
//! keep-alive throughput (every request path free may madvise), so instead the publisher
//! asks for a collection once per swap, on its own thread, where it costs nothing per
//! request.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The global allocator: mimalloc, asked for a plain allocation whenever the layout allows;
/// `#[global_allocator] static A: Allocator = Allocator;`.
///
/// The `mimalloc` crate's allocator passes every request to `mi_malloc_aligned`. mimalloc 3
/// serves an aligned request above 1 KiB, or one whose block size is not a power of two, by
/// over-allocating (size plus alignment, then an interior pointer): a slower path, a larger
/// block, and a slower free. That was 2.8 of the 6.9 allocations of a keep-alive request
/// (the forwarding future, read buffers; docs/performance.md), for alignments of 8 or 16 that
/// a plain `mi_malloc` gives anyway: its blocks are 8-byte aligned, and 16-byte aligned from 16
/// bytes up. The rule is the one Rust's `System` allocator uses with `malloc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocator;

/// The alignment `mi_malloc` gives every block of at least this size.
const MIN_ALIGN: usize = 16;

fn plain(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` takes blocks of
// the plain and the aligned calls alike); a plain call is made only where mimalloc's own
// alignment meets the layout's (see `plain`), else the aligned call with the layout's
// alignment. Sizes and pointers are passed through unchanged.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: see the impl.
        unsafe {
            if plain(align, size) {
                mi::mi_malloc(size).cast()
            } else {
                mi::mi_malloc_aligned(size, align).cast()
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: see the impl.
        unsafe {
            if plain(align, size) {
                mi::mi_zalloc(size).cast()
            } else {
                mi::mi_zalloc_aligned(size, align).cast()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: see the impl; `ptr` was returned by this allocator.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl; `ptr` was returned by this allocator with `layout`.
        unsafe {
            if plain(layout.align(), new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

/// Returns the memory this thread freed (and everything mimalloc has scheduled for purging
/// in any thread) to the OS now, instead of after mimalloc's purge delay and only on later
/// allocator activity. Meant for the control plane after a table swap: it takes as long as
/// the madvise calls it makes (7.6 ms after a 5,000-Service table was replaced, 23 us when
/// nothing was freed). Harmless when mimalloc is not the global allocator (tests): it then
/// finds nothing to collect.
pub fn release_free_memory() {
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any time;
    // it only walks this thread's heap and mimalloc's own arenas under their own locks.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}
