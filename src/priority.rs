//! Thread priorities: Linux nice values, which the kernel keeps per thread and a new thread
//! inherits from the one that starts it.
//!
//! The log's writer is the thread every appender waits on. It asks for a higher priority than
//! the request threads, so that a request thread it wakes with an answer does not take its core
//! before the rest of the group is answered and the next group is under way. The daemon's live
//! projector asks for the lowest, so appends come first.
//!
//! Both are best effort. Raising a priority needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows
//! it (`ops/systemd/spool.service` sets `LimitNICE=-5`); refused, a thread keeps the priority it
//! had.
//!
//! Boundary: only module calling `setpriority`; knows nothing of what the threads do.

/// The writer's nice value. The serve bench on 2 cores, 4 interleaved runs of each, events/s:
/// - 64 clients x 1-event requests: 58 539, 59 622, 52 613, 46 779 with the writer at nice 0;
///   59 952, 61 656, 60 300, 56 813 at -5;
/// - 64 clients x 100-event requests: 313 008, 399 945, 285 197, 303 863 at 0; 417 127,
///   419 699, 391 098, 390 677 at -5.
///
/// The request threads at nice 5 instead (writer at 0) lost about a fifth of the first figure
/// (38 888, 41 659), the load generator's own threads taking their share. A scheduler trace of
/// the writer at nice 0 under the second load found a fifth of its switches off the core inside
/// the send of an answer, waking a request thread.
pub const WRITER_NICE: i32 = -5;

/// The live projector's nice value. With 64 clients sending 100-event requests, 5 interleaved
/// pairs of the serve bench gave a median of 324 000 events/s at nice 19 against 289 000 at
/// nice 10: under load the projector's share of the two cores went to appends. Not
/// `SCHED_IDLE` (a fifth of nice 19's weight): a thread that gets almost no CPU while appends
/// run could hold a lock the writer needs (the log's page cache) for most of a burst; nor did
/// it measure faster (5 rounds of the same load, fresh daemon each: a median of 229 414
/// events/s at `SCHED_IDLE` against 242 104 at nice 19).
pub const PROJECTOR_NICE: i32 = 19;

/// Sets the calling thread's nice value; the threads it starts afterwards inherit it. Returns
/// whether the kernel accepted it.
pub fn set_thread_nice(nice: i32) -> bool {
    // SAFETY: plain system calls on the calling thread, with no pointers.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_lowers_its_own_priority_and_not_its_callers() {
        // SAFETY: reads the calling thread's nice value; errno is cleared first, as -1 is a
        // valid value.
        let nice = || unsafe {
            *libc::__errno_location() = 0;
            libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
        };
        let before = nice();
        let (set, inside) = std::thread::spawn(move || (set_thread_nice(PROJECTOR_NICE), nice()))
            .join()
            .unwrap();
        assert!(set, "lowering a priority needs no privilege");
        assert_eq!(inside, PROJECTOR_NICE);
        assert_eq!(nice(), before);
    }
}
