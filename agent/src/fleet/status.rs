//! A CanaryRelease's `status` and its Events, from what the agent publishes
//! (pure: [`super::kubernetes`] writes them).
//!
//! The phases are Flagger's where they mean the same, so dashboards and
//! habits carry over: `Pending` (not steered: the release is incomplete or
//! refused, the `Ready` condition says why), `Initialized` (no canary to
//! roll out), `Progressing`, `Paused`, `Succeeded` (promoted), `Failed`
//! (rolled back).

use serde_json::{Value, json};

use crate::rollout::{Phase, State};

/// The views the status writer reads, by key.
pub type Releases = std::collections::BTreeMap<String, ReleaseView>;

/// What the loop knows of one CanaryRelease (or, with etcd, one service).
#[derive(Clone, Debug, PartialEq)]
pub struct ReleaseView {
    /// Its kanari service (NAMESPACE.NAME).
    pub service: String,
    /// `metadata.generation` of the reading in force.
    pub generation: i64,
    /// Why its newest reading is not in force (field, message).
    pub why: Option<(String, String)>,
    /// Whether a reading of it is steered.
    pub steered: bool,
    /// The decision its status held when last read.
    pub decision: Option<crate::rollout::Decision>,
}

/// The phase a release shows.
pub fn phase(release: &ReleaseView, state: Option<&State>) -> &'static str {
    match state.map(|s| s.phase) {
        _ if !release.steered => "Pending",
        None | Some(Phase::Idle) => "Initialized",
        Some(Phase::Progressing) => "Progressing",
        Some(Phase::Paused) => "Paused",
        Some(Phase::Promoted) => "Succeeded",
        Some(Phase::RolledBack) => "Failed",
    }
}

/// Who wrote a status: the deciding agent and its term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Writer<'a> {
    pub agent: &'a str,
    pub term: u32,
}

/// The status to write (without `lastTransitionTime`, which the writer
/// keeps from when it saw the phase change).
pub fn status(release: &ReleaseView, state: Option<&State>, by: &Writer) -> Value {
    let phase = phase(release, state);
    let (ready, reason, message) = match (&release.why, release.steered) {
        (Some((field, why)), true) => (
            "True",
            "NewestRefused",
            format!("the last valid spec is in force; {field}: {why}"),
        ),
        (Some((field, why)), false) => ("False", "Refused", format!("{field}: {why}")),
        (None, _) => ("True", "Steered", "steered on every node".to_string()),
    };
    let mut status = json!({
        "phase": phase,
        "observedGeneration": release.generation,
        "leader": {"agent": by.agent, "term": by.term},
        "conditions": [{"type": "Ready", "status": ready, "reason": reason, "message": message}],
    });
    if let Some(s) = state {
        // Followers take weight, step and phase, for this revision, with
        // a generation raised whenever one of them changes.
        let same = release.decision.as_ref().is_some_and(|d| {
            d.weight == s.weight
                && d.step == s.step
                && d.phase == s.phase
                && d.revision == s.revision
        });
        let last = release.decision.as_ref().map_or(0, |d| d.generation);
        status["weightGeneration"] = json!(if same { last } else { last + 1 });
        status["revision"] = json!(s.revision);
        status["canaryWeight"] = json!(s.weight as f64 / 100.0);
        status["step"] = json!(s.step);
        status["iterations"] = json!(s.passes);
        status["failedChecks"] = json!(s.failures);
        status["message"] = json!(s.reason);
        status["verdicts"] = s
            .last_check
            .iter()
            .map(|j| {
                let why = match &j.verdict {
                    crate::analysis::Verdict::Pass => String::new(),
                    crate::analysis::Verdict::Fail(w)
                    | crate::analysis::Verdict::Inconclusive(w) => w.clone(),
                };
                json!({"judge": j.judge.name(), "verdict": j.verdict.name(), "why": why})
            })
            .collect();
    } else {
        status["canaryWeight"] = json!(0.0);
    }
    status
}

/// The decision a status holds (the inverse of [`status`]): what a
/// follower takes.
pub fn decision(status: &Value) -> Option<crate::rollout::Decision> {
    let phase = match status.get("phase")?.as_str()? {
        "Progressing" => Phase::Progressing,
        "Paused" => Phase::Paused,
        "Succeeded" => Phase::Promoted,
        "Failed" => Phase::RolledBack,
        _ => return None,
    };
    let percent = status.get("canaryWeight")?.as_f64()?;
    Some(crate::rollout::Decision {
        revision: status.get("revision")?.as_str()?.to_string(),
        phase,
        weight: crate::config::percent_to_basis_points(percent).ok()?,
        step: status.get("step")?.as_u64()? as usize,
        generation: status.get("weightGeneration")?.as_u64()?,
        term: status.get("leader")?.get("term")?.as_u64()? as u32,
    })
}

/// An Event for a change between two phases or steps: (type, reason, message).
pub fn event(
    before: Option<(&'static str, usize)>,
    now: (&'static str, usize),
    state: Option<&State>,
) -> Option<(&'static str, &'static str, String)> {
    if before == Some(now) {
        return None;
    }
    let said = state.map_or(String::new(), |s| {
        format!("{}% canary: {}", s.weight as f64 / 100.0, s.reason)
    });
    let (kind, reason) = match now.0 {
        "Progressing" if before.is_some_and(|b| b.0 == "Progressing") => ("Normal", "StepChanged"),
        "Progressing" => ("Normal", "Progressing"),
        "Paused" => ("Normal", "Paused"),
        "Succeeded" => ("Normal", "Promoted"),
        "Failed" => ("Warning", "RolledBack"),
        "Pending" => ("Warning", "Refused"),
        _ => ("Normal", "Initialized"),
    };
    Some((kind, reason, said))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(steered: bool, why: Option<(&str, &str)>) -> ReleaseView {
        ReleaseView {
            service: "shop.web".into(),
            generation: 4,
            why: why.map(|(f, m)| (f.into(), m.into())),
            steered,
            decision: None,
        }
    }

    #[test]
    fn a_refused_release_is_pending_and_says_why_and_a_kept_one_stays_ready() {
        let by = Writer {
            agent: "node-a",
            term: 3,
        };
        let s = status(
            &view(false, Some(("spec.rollout.steps", "must rise"))),
            None,
            &by,
        );
        assert_eq!(s["phase"], "Pending");
        assert_eq!(s["conditions"][0]["status"], "False");
        assert_eq!(
            s["conditions"][0]["message"],
            "spec.rollout.steps: must rise"
        );
        assert_eq!(s["leader"], json!({"agent": "node-a", "term": 3}));
        assert_eq!(s["observedGeneration"], 4);

        let s = status(
            &view(true, Some(("spec.rollout.steps", "must rise"))),
            None,
            &by,
        );
        assert_eq!(s["phase"], "Initialized");
        assert_eq!(s["conditions"][0]["status"], "True");
        assert_eq!(s["conditions"][0]["reason"], "NewestRefused");
    }

    fn state() -> State {
        let c = crate::config::parse(
            "t.yaml",
            "interfaces: [{name: e}]\nservices: [{name: w, vip: 10.0.0.1:80, stable: {backends: [10.0.2.1:80]}, canary: {backends: [10.0.3.1:80]}, rollout: {}}]",
            &|_| true,
        )
        .expect("valid");
        let spec = c.services[0].rollout.clone().expect("a rollout");
        State::new(
            "r".into(),
            true,
            c.services[0].canary.clone(),
            0,
            &spec.rollout,
        )
    }

    #[test]
    fn phases_and_events_follow_the_rollout() {
        let mut st = state();
        st.phase = Phase::Progressing;
        st.weight = 2500;
        st.step = 1;
        st.passes = 2;
        st.reason = "checks passed".into();
        let by = Writer {
            agent: "a",
            term: 1,
        };
        let s = status(&view(true, None), Some(&st), &by);
        assert_eq!(s["phase"], "Progressing");
        assert_eq!(s["canaryWeight"], 25.0);
        assert_eq!(s["step"], 1);
        assert_eq!(s["iterations"], 2);
        assert_eq!(s["message"], "checks passed");

        assert_eq!(
            event(Some(("Progressing", 0)), ("Progressing", 1), Some(&st)),
            Some(("Normal", "StepChanged", "25% canary: checks passed".into()))
        );
        assert_eq!(
            event(Some(("Progressing", 1)), ("Progressing", 1), Some(&st)),
            None
        );
        st.phase = Phase::RolledBack;
        let p = phase(&view(true, None), Some(&st));
        assert_eq!(p, "Failed");
        assert_eq!(
            event(Some(("Progressing", 1)), (p, 1), Some(&st)).map(|e| (e.0, e.1)),
            Some(("Warning", "RolledBack"))
        );
    }
}
