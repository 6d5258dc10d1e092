//! A rollout decided by another agent (the fleet's leader): this engine
//! takes the leader's weight, step and phase, and only ever lowers the
//! weight on its own — when its critical path fails the canary.
//!
//! - Only the leader raises. A follower's check path does not run; its
//!   critical path does, and a rollback it decides stands (and is reported)
//!   until a new revision: a later decision to raise is not taken.
//! - Without a leader (none elected, or the API server away) a follower
//!   keeps the weight it holds.
//! - A decision for another revision than the follower's (it has not yet
//!   read the new release, or the leader has not) is not taken.

use super::{Action, Engine, Phase, State};
use crate::config::OnRollback;

/// What the deciding agent wrote for one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub revision: String,
    pub phase: Phase,
    /// Basis points.
    pub weight: u32,
    pub step: usize,
    /// Raised with every weight the leader writes.
    pub generation: u64,
    /// The leader's term.
    pub term: u32,
}

/// Whether a follower at `state` takes `d`.
fn takes(state: &State, d: &Decision) -> bool {
    if state.revision != d.revision || state.phase == Phase::Idle {
        return false;
    }
    // Lowered here: it stays down until a new revision, whatever it is told.
    if state.phase == Phase::RolledBack && d.weight > state.weight {
        return false;
    }
    state.phase != d.phase || state.weight != d.weight || state.step != d.step
}

impl Engine {
    /// Whether every node reporting holds `service`'s weight: until they
    /// do, its analysis window stays closed (a leader judges a step on the
    /// fleet's traffic at that step); it opens, afresh, when they do.
    pub fn set_in_sync(&mut self, service: &str, in_sync: bool, now_ms: u64) {
        let held = !in_sync;
        if held == self.held_windows.contains(service) {
            return;
        }
        if held {
            self.held_windows.insert(service.to_string());
            return;
        }
        self.held_windows.remove(service);
        if let Some(t) = self.services.get_mut(service) {
            t.window_start = None;
            t.state.window_since_ms = now_ms;
            t.state.check_since_ms = now_ms;
            self.generation += 1;
        }
    }

    /// The services decided elsewhere (their check path off).
    pub fn set_following(&mut self, services: std::collections::BTreeSet<String>) {
        if self.following != services {
            self.following = services;
            self.generation += 1;
        }
    }

    pub fn is_following(&self, service: &str) -> bool {
        self.following.contains(service)
    }

    /// Takes the leader's decision for `service` at `now_ms` if it applies:
    /// the actions it takes here (`None`: not taken). A rollback decided
    /// with `on_rollback: cut` cuts this node's canary connections too.
    pub fn follow(&mut self, service: &str, d: &Decision, now_ms: u64) -> Option<Vec<Action>> {
        if !self.following.contains(service) {
            return None;
        }
        let t = self.services.get_mut(service)?;
        if !takes(&t.state, d) {
            return None;
        }
        let mut actions = Vec::new();
        if d.phase == Phase::RolledBack
            && t.state.phase != Phase::RolledBack
            && t.cfg.on_rollback == OnRollback::Cut
        {
            actions.push(Action::CutCanary);
        }
        let mut next = t.state.clone();
        if next.weight != d.weight || next.step != d.step {
            next.step_since_ms = now_ms;
            next.window_since_ms = now_ms;
            next.check_since_ms = now_ms;
            t.window_start = None;
        }
        let raised = d.weight > next.weight;
        next.phase = d.phase;
        next.weight = d.weight;
        next.planned_weight = d.weight;
        next.step = d.step;
        next.reason = format!(
            "decided by the fleet's leader (term {}, generation {})",
            d.term, d.generation
        );
        self.record(service, &next, &[]);
        let t = self.services.get_mut(service).expect("tracked");
        t.state = next;
        self.generation += 1;
        self.persist(service, raised);
        Some(actions)
    }
}
