//! Thread priorities: Linux nice values and scheduling policies, which the kernel keeps per
//! thread and a new thread inherits from the one that starts it.
//!
//! The log's writer is the thread every appender waits on. It asks for a higher priority than
//! the request threads, so that a request thread it wakes with an answer does not take its core
//! before the rest of the group is answered and the next group is under way. The daemon's live
//! projector asks for `SCHED_IDLE`, so appends come first.
//!
//! Both are best effort. Raising a priority needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows
//! it (`ops/systemd/spool.service` sets `LimitNICE=-5`); refused, a thread keeps the priority it
//! had. Lowering one is always allowed.
//!
//! Boundary: only module calling `setpriority` and `sched_setscheduler`; knows nothing of what
//! the threads do.

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

/// The live projector's nice value where `SCHED_IDLE` is refused: the lowest. With 64 clients
/// sending 100-event requests, 5 interleaved pairs of the serve bench gave a median of 324 000
/// events/s at nice 19 against 289 000 at nice 10.
pub const PROJECTOR_NICE: i32 = 19;

/// Puts the calling thread in the `SCHED_IDLE` policy, which the live projector runs in: it takes
/// what the other threads leave of the cores, and a core running only such a thread counts as
/// idle when the kernel places a waking request thread or the writer. At nice 19 the projector
/// still took 11-18% of the two cores while 64 clients sent 100-event requests (`/proc/stat`'s
/// nice time, per second); 7 interleaved pairs of that load (the serve bench, a fresh daemon
/// each) gave a median of 305 677 events/s in `SCHED_IDLE` against 288 837 at nice 19, the
/// slowest of the first above the median of the second (an earlier run, 5 rounds in one daemon,
/// had measured it slower: 229 414 against 242 104). A thread in it is not starved: it keeps a
/// small share (weight 3 against nice 19's 15) and every idle moment, so the projection still
/// moves under a load that fills both cores (12-27% of a core, per second, in the serve bench)
/// and catches up when the load ends. The risk is nice 19's, larger: off its core while it holds
/// a lock the writer needs (a shard of redb's cache), it gets the core back once one is idle,
/// which the writer waiting brings about; the p99 at 16 clients stayed under 2 ms. Returns
/// whether the kernel accepted it.
pub fn set_thread_idle() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a system call on the calling thread (0) with a valid parameter block.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
}

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

    #[test]
    fn an_idle_thread_and_the_threads_it_starts_are_idle_and_its_caller_is_not() {
        // SAFETY: reads the calling thread's policy.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        let before = policy();
        assert_ne!(before, libc::SCHED_IDLE);
        let (set, inside, child) = std::thread::spawn(move || {
            let set = set_thread_idle();
            let child = std::thread::spawn(policy).join().unwrap();
            (set, policy(), child)
        })
        .join()
        .unwrap();
        assert!(set, "lowering a policy needs no privilege");
        assert_eq!(inside, libc::SCHED_IDLE);
        assert_eq!(
            child,
            libc::SCHED_IDLE,
            "a thread the projector starts inherits it"
        );
        assert_eq!(policy(), before);
    }
}
