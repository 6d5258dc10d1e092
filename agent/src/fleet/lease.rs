//! Who decides: a `coordination.k8s.io` Lease held the way client-go's
//! leader election holds one (pure; [`super::kubernetes`] reads and writes it).
//!
//! - A lease is free when nobody holds it, or when its record (holder and
//!   renew time) has not changed for its duration *as seen by this agent's
//!   clock*: the holder's clock is never compared with ours.
//! - Taking it over raises `leaseTransitions`: that number is the leader's
//!   **term**, written beside every decision so a deposed leader's late
//!   write is told from its successor's.
//! - A leader that cannot renew stops deciding when its own lease would
//!   have lapsed ([`Elector::leading`]); another may take it only after a
//!   full duration without a change, so two never decide at once while
//!   clocks run at the same rate.

/// A Lease as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    /// `renewTime` as written (compared for change, never as a time).
    pub renew: Option<String>,
    pub duration_s: u32,
    pub transitions: u32,
}

/// What to do with the lease now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write it with us as holder and this term (a new term: taken over).
    Take { term: u32 },
    /// Write it with a new renew time, same term.
    Renew { term: u32 },
    /// Another holds it.
    Follow { holder: String },
}

/// One agent's view of the lease across readings.
#[derive(Clone, Debug)]
pub struct Elector {
    me: String,
    duration_ms: u64,
    /// The record last read, and when (our clock) it was first seen so.
    seen: Option<(Record, u64)>,
    /// Until when (our clock) our last successful write keeps us leader.
    leading_until_ms: Option<(u64, u32)>,
    /// The highest term seen: a lease deleted and made anew continues it,
    /// so followers that ignore older terms still take the new leader's.
    max_term: u32,
}

impl Elector {
    pub fn new(me: impl Into<String>, duration_ms: u64) -> Self {
        Self {
            me: me.into(),
            duration_ms,
            seen: None,
            leading_until_ms: None,
            max_term: 0,
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// What to do, given the lease as read at `now_ms` (`None`: absent).
    pub fn next(&mut self, lease: Option<&Record>, now_ms: u64) -> Step {
        let Some(lease) = lease else {
            self.seen = None;
            return Step::Take {
                term: self.max_term + 1,
            };
        };
        self.max_term = self.max_term.max(lease.transitions);
        let since = match &self.seen {
            Some((r, at)) if r.holder == lease.holder && r.renew == lease.renew => *at,
            _ => now_ms,
        };
        self.seen = Some((lease.clone(), since));
        match &lease.holder {
            Some(h) if *h == self.me => Step::Renew {
                term: lease.transitions,
            },
            Some(h) if !h.is_empty() => {
                let duration = (lease.duration_s as u64 * 1000).max(self.duration_ms);
                if now_ms.saturating_sub(since) >= duration {
                    Step::Take {
                        term: lease.transitions + 1,
                    }
                } else {
                    Step::Follow { holder: h.clone() }
                }
            }
            // Released (holder cleared): free at once.
            _ => Step::Take {
                term: lease.transitions + 1,
            },
        }
    }

    /// A write of `step` begun at `began_ms` succeeded: we lead for a
    /// duration from when the write began.
    pub fn wrote(&mut self, term: u32, began_ms: u64) {
        self.leading_until_ms = Some((began_ms + self.duration_ms, term));
    }

    /// Another holds it (or a write lost a race): we do not lead.
    pub fn lost(&mut self) {
        self.leading_until_ms = None;
    }

    /// Our term while our lease lasts at `now_ms`.
    pub fn leading(&self, now_ms: u64) -> Option<u32> {
        self.leading_until_ms
            .filter(|(until, _)| now_ms < *until)
            .map(|(_, term)| term)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(by: &str, renew: &str, transitions: u32) -> Record {
        Record {
            holder: Some(by.into()),
            renew: Some(renew.into()),
            duration_s: 10,
            transitions,
        }
    }

    #[test]
    fn an_absent_or_released_lease_is_taken_with_a_new_term() {
        let mut e = Elector::new("a", 10_000);
        assert_eq!(e.next(None, 0), Step::Take { term: 1 });
        // A lease deleted after term 7: the next term is 8, not 1.
        let mut seen = Elector::new("b", 10_000);
        seen.next(Some(&held("c", "t", 7)), 0);
        assert_eq!(seen.next(None, 1), Step::Take { term: 8 });
        let released = Record {
            holder: None,
            renew: None,
            duration_s: 10,
            transitions: 4,
        };
        assert_eq!(e.next(Some(&released), 5), Step::Take { term: 5 });
    }

    #[test]
    fn a_held_lease_is_taken_only_after_a_duration_without_change_on_our_clock() {
        let mut e = Elector::new("b", 10_000);
        // The holder's renew time says nothing of our clock: only change counts.
        assert_eq!(
            e.next(Some(&held("a", "2020-01-01T00:00:00Z", 3)), 1_000),
            Step::Follow { holder: "a".into() }
        );
        assert_eq!(
            e.next(Some(&held("a", "2020-01-01T00:00:00Z", 3)), 10_999),
            Step::Follow { holder: "a".into() }
        );
        // Renewed: the wait starts again.
        assert_eq!(
            e.next(Some(&held("a", "2020-01-01T00:00:05Z", 3)), 10_999),
            Step::Follow { holder: "a".into() }
        );
        assert_eq!(
            e.next(Some(&held("a", "2020-01-01T00:00:05Z", 3)), 20_998),
            Step::Follow { holder: "a".into() }
        );
        assert_eq!(
            e.next(Some(&held("a", "2020-01-01T00:00:05Z", 3)), 20_999),
            Step::Take { term: 4 }
        );
    }

    #[test]
    fn the_holder_renews_in_its_term_and_leads_only_while_its_write_lasts() {
        let mut e = Elector::new("a", 10_000);
        assert_eq!(
            e.next(Some(&held("a", "t1", 7)), 0),
            Step::Renew { term: 7 }
        );
        assert_eq!(e.leading(0), None, "not before a write succeeded");
        e.wrote(7, 100);
        assert_eq!(e.leading(10_099), Some(7));
        // Renewals failing (API server away): it stops deciding on its own.
        assert_eq!(e.leading(10_100), None);
        e.wrote(7, 20_000);
        e.lost();
        assert_eq!(e.leading(20_001), None);
    }

    #[test]
    fn two_electors_never_lead_at_once() {
        // a holds and renews every 3 s until it stops at 30 s; b watches.
        let (mut a, mut b) = (Elector::new("a", 10_000), Elector::new("b", 10_000));
        let mut lease: Option<Record> = None;
        let mut led_by_b_at = None;
        for now in (0..60_000).step_by(500) {
            for e in [&mut a, &mut b] {
                if e.me() == "a" && now >= 30_000 {
                    continue;
                }
                let (term, holder) = match e.next(lease.as_ref(), now) {
                    Step::Take { term } | Step::Renew { term } => (term, e.me().to_string()),
                    Step::Follow { .. } => {
                        e.lost();
                        continue;
                    }
                };
                if e.me() == "a" && now % 3_000 != 0 && lease.is_some() {
                    continue;
                }
                lease = Some(Record {
                    holder: Some(holder),
                    renew: Some(format!("{now}")),
                    duration_s: 10,
                    transitions: term,
                });
                e.wrote(term, now);
            }
            assert!(
                a.leading(now).is_none() || b.leading(now).is_none(),
                "both lead at {now}"
            );
            if led_by_b_at.is_none() && b.leading(now).is_some() {
                led_by_b_at = Some(now);
            }
        }
        // a's last renewal was at 27 s: b takes over a duration after it saw it.
        let at = led_by_b_at.expect("b took over");
        assert!((37_000..=38_000).contains(&at), "{at}");
        assert_eq!(lease.expect("held").transitions, 2);
    }
}
