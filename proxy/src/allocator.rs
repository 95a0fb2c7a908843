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

/// The global allocator type; `#[global_allocator] static A: Allocator = Allocator;`.
pub use mimalloc::MiMalloc as Allocator;

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
