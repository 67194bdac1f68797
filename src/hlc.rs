//! Hybrid logical clock: one u64 per stamp, physical milliseconds in the high 48 bits and a logical
//! counter in the low 16.
//!
//! Invariants: every stamp this clock issues is greater than every stamp it issued or observed
//! before (observed stamps clamped as below), across restarts as long as it is seeded with the
//! highest stamp persisted. A stamp more than `max_drift_ms` ahead of the physical clock moves the
//! clock only to `now + max_drift_ms`; the event carrying it is kept, and the clamp is reported.
//! Causal order never depends on this clock (it comes from `prev` and `deps`); the clock only
//! breaks ties between concurrent writes. Because a clamped stamp can sit *below* a stamp its
//! event depends on, winners are picked by [`order`], not by the stamp: the stamp raised past
//! every predecessor's order, so `a` happened-before `b` implies `order(a) < order(b)` whatever
//! the clocks said.
//!
//! Boundary: pure. The caller passes the physical time in; nothing here reads a clock or a disk.

/// Bits of the logical counter.
pub const LOGICAL_BITS: u32 = 16;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

/// Packs a physical time (ms since the Unix epoch) and a logical counter into a stamp.
pub fn pack(physical_ms: u64, logical: u16) -> u64 {
    (physical_ms << LOGICAL_BITS) | logical as u64
}

/// The physical part of a stamp, in ms since the Unix epoch.
pub fn physical_ms(stamp: u64) -> u64 {
    stamp >> LOGICAL_BITS
}

/// The logical part of a stamp.
pub fn logical(stamp: u64) -> u16 {
    (stamp & LOGICAL_MASK) as u16
}

/// What observing a received stamp did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Observed {
    /// The clock now stands at or past the stamp.
    Accepted,
    /// The stamp was too far ahead of the physical clock; the clock moved only to `clamped_to`.
    Clamped { stamp: u64, clamped_to: u64 },
}

#[derive(Clone, Debug)]
pub struct Hlc {
    last: u64,
    max_drift_ms: u64,
}

impl Hlc {
    /// A clock that continues after `last`, the highest stamp persisted before.
    pub fn new(last: u64, max_drift_ms: u64) -> Hlc {
        Hlc { last, max_drift_ms }
    }

    /// The highest stamp issued or observed.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Issues a stamp for a local event.
    pub fn tick(&mut self, now_ms: u64) -> u64 {
        let wall = pack(now_ms.min(physical_ms(u64::MAX)), 0);
        self.last = if wall > self.last {
            wall
        } else {
            // A full logical counter carries into the physical part; that stays ordered.
            self.last.saturating_add(1)
        };
        self.last
    }

    /// Moves the clock past a stamp received from another node.
    pub fn observe(&mut self, stamp: u64, now_ms: u64) -> Observed {
        let ceiling = pack(
            now_ms
                .saturating_add(self.max_drift_ms)
                .min(physical_ms(u64::MAX)),
            u16::MAX,
        );
        if stamp <= ceiling {
            self.last = self.last.max(stamp);
            Observed::Accepted
        } else {
            self.last = self.last.max(ceiling);
            Observed::Clamped {
                stamp,
                clamped_to: ceiling,
            }
        }
    }
}

/// An event's causal order: its stamp, raised past the orders of the events it directly
/// follows (its `prev` and its `deps`). Orders grow along every chain, so the events a `deps`
/// entry implies are covered by that entry, and the result depends only on the event's causal
/// past: every node computes the same order for it.
pub fn order(stamp: u64, predecessors: impl IntoIterator<Item = u64>) -> u64 {
    predecessors
        .into_iter()
        .fold(stamp, |order, p| order.max(p.saturating_add(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DRIFT: u64 = 60_000;

    #[derive(Clone, Debug)]
    enum Step {
        Tick { now: u64 },
        Observe { stamp: u64, now: u64 },
        Restart,
    }

    fn step() -> impl Strategy<Value = Step> {
        // Physical times around 2026, with jumps backwards and forwards as a Pi's clock does.
        let now = 1_790_000_000_000u64..1_790_000_100_000u64;
        prop_oneof![
            now.clone().prop_map(|now| Step::Tick { now }),
            (now.clone(), 0u64..=200_000, 0u16..=u16::MAX).prop_map(|(now, ahead, l)| {
                Step::Observe {
                    stamp: pack(now + ahead - 100_000, l),
                    now,
                }
            }),
            Just(Step::Restart),
        ]
    }

    proptest! {
        #[test]
        fn stamps_strictly_increase_and_pass_observed_ones(steps in prop::collection::vec(step(), 1..200)) {
            let mut clock = Hlc::new(0, DRIFT);
            let mut persisted = 0;
            let mut last_issued = 0u64;
            let mut must_exceed = 0u64;
            for s in steps {
                match s {
                    Step::Tick { now } => {
                        let t = clock.tick(now);
                        prop_assert!(t > last_issued, "stamp {t} not past {last_issued}");
                        prop_assert!(t > must_exceed, "stamp {t} not past observed {must_exceed}");
                        prop_assert!(physical_ms(t) >= now);
                        last_issued = t;
                        persisted = clock.last();
                    }
                    Step::Observe { stamp, now } => {
                        match clock.observe(stamp, now) {
                            Observed::Accepted => {
                                prop_assert!(physical_ms(stamp) <= now + DRIFT);
                                must_exceed = must_exceed.max(stamp);
                            }
                            Observed::Clamped { clamped_to, .. } => {
                                prop_assert!(physical_ms(stamp) >= now + DRIFT);
                                prop_assert_eq!(clamped_to, pack(now + DRIFT, u16::MAX));
                                prop_assert!(clock.last() >= clamped_to);
                                must_exceed = must_exceed.max(clamped_to);
                            }
                        }
                        persisted = clock.last();
                    }
                    Step::Restart => clock = Hlc::new(persisted, DRIFT),
                }
            }
        }

        #[test]
        fn a_far_future_stamp_does_not_drag_the_clock_along(now in 1_000_000u64..1_000_000_000, ahead in (DRIFT + 1)..u32::MAX as u64) {
            let mut clock = Hlc::new(0, DRIFT);
            let far = pack(now + ahead, 0);
            let clamped = matches!(clock.observe(far, now), Observed::Clamped { .. });
            prop_assert!(clamped, "a stamp {ahead} ms ahead was accepted");
            let t = clock.tick(now);
            prop_assert!(physical_ms(t) <= now + DRIFT + 1);
        }
    }

    #[test]
    fn logical_counter_carries_into_physical() {
        let mut clock = Hlc::new(pack(10, u16::MAX), DRIFT);
        let t = clock.tick(5);
        assert_eq!((physical_ms(t), logical(t)), (11, 0));
    }

    #[test]
    fn an_order_passes_every_predecessor_and_keeps_an_honest_stamp() {
        let desktop = pack(1_790_018_000_000, 0); // five hours ahead
        let clamped_edit = pack(1_790_000_060_000, 3); // the VM's clock, clamped below it
        let edit = order(clamped_edit, [desktop]);
        assert!(edit > desktop);
        assert_eq!(order(desktop, [clamped_edit]), desktop);
        assert_eq!(order(7, []), 7);
        assert_eq!(order(7, [u64::MAX]), u64::MAX);
    }

    #[test]
    fn pack_and_unpack_agree() {
        let s = pack(1_790_000_000_123, 77);
        assert_eq!(physical_ms(s), 1_790_000_000_123);
        assert_eq!(logical(s), 77);
    }
}
