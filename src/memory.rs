//! Allocator tuning and trimming: the collector's bursts and the renderer's bodies are short-lived, and
//! without these the process keeps their high-water mark as RSS.

/// Caps glibc's per-thread malloc arenas: each arena keeps its own high-water mark, and the collector's
/// bursts of short-lived allocations on several worker threads otherwise multiply peak RSS.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands memory freed by a render or a cycle back to the OS, so RSS follows the live set.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
