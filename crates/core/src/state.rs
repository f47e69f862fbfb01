//! The task and request state machines.
//!
//! Delivery is at least once, so the coordinator sees duplicates, stale
//! redispatches and late outcomes. Those are *ignored*: a terminal state
//! never changes through an outcome, a dispatch or a requeue. The only way
//! out of `failed` is an explicit operator retry; the only way out of
//! `retained` and `held` is a follow-up (a retention period ended, a legal
//! hold was released).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::outcome::OutcomeClass;

/// The state of one (request, system) task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Planned; its outbox row awaits publishing.
    Pending,
    /// Published to the bus; no final outcome yet.
    Dispatched,
    /// The connector started an asynchronous job in the external system.
    Accepted,
    /// Erased, anonymised or nothing found, and verified.
    Succeeded,
    /// Erased in part; the rest is kept on a legal basis until a follow-up.
    Retained,
    /// Not dispatched: a legal hold covers everything the system holds.
    Held,
    /// Failed for good (attempts exhausted, permanent error or under-deletion).
    Failed,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        Self::Pending,
        Self::Dispatched,
        Self::Accepted,
        Self::Succeeded,
        Self::Retained,
        Self::Held,
        Self::Failed,
    ];

    /// Settled: nothing in flight. Outcomes, dispatches and requeues are
    /// ignored from here.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Retained | Self::Held | Self::Failed)
    }

    /// Data kept on purpose that a later follow-up will erase.
    pub fn is_exempted(self) -> bool {
        matches!(self, Self::Retained | Self::Held)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Dispatched => "dispatched",
            Self::Accepted => "accepted",
            Self::Succeeded => "succeeded",
            Self::Retained => "retained",
            Self::Held => "held",
            Self::Failed => "failed",
        }
    }

    /// Whether a worker holding attempt `attempt` of a task in this state
    /// may have the task's key, where `attempts` is the last attempt
    /// recorded as published. Only work still asked for is served: a
    /// pending task's next attempt (a fast worker may read it before its
    /// publication is recorded), and an in-flight task's current attempt
    /// or the next one (a republication). A settled task, or an attempt
    /// that was withdrawn (a legal hold changed the plan after it was
    /// published) or superseded, gets none. `None` (a worker that does not
    /// say which attempt it holds) is served whenever the task is unsettled.
    pub fn serves_key(self, attempts: i64, attempt: Option<u32>) -> bool {
        let current = |ok: &[i64]| attempt.is_none_or(|a| ok.contains(&i64::from(a)));
        match self {
            Self::Pending => current(&[attempts + 1]),
            Self::Dispatched | Self::Accepted => current(&[attempts, attempts + 1]),
            Self::Succeeded | Self::Retained | Self::Held | Self::Failed => false,
        }
    }

    /// Applies `event`. `Ok(Step::Ignored)` is a harmless duplicate or late
    /// message; `Err` is a command that makes no sense in this state.
    pub fn apply(self, event: TaskEvent) -> Result<Step, IllegalTransition> {
        use TaskState::*;
        let next = match (self, event) {
            // An accepted task is dispatched again to check its external job.
            (Pending | Dispatched | Accepted, TaskEvent::Dispatched) => Dispatched,
            (_, TaskEvent::Dispatched) => return Ok(Step::Ignored),
            (s, TaskEvent::Outcome(_)) if s.is_terminal() => return Ok(Step::Ignored),
            (Accepted, TaskEvent::Outcome(OutcomeClass::Accepted)) => return Ok(Step::Ignored),
            (_, TaskEvent::Outcome(class)) => match class {
                OutcomeClass::Succeeded => Succeeded,
                OutcomeClass::Retained => Retained,
                OutcomeClass::Failed => Failed,
                OutcomeClass::Accepted => Accepted,
            },
            (Failed, TaskEvent::Retry) => Pending,
            (state, TaskEvent::Retry) => return Err(IllegalTransition { state, event: "retry" }),
            (Retained | Held, TaskEvent::FollowUp) => Pending,
            (_, TaskEvent::FollowUp) => return Ok(Step::Ignored),
            (s, TaskEvent::Requeue) if s.is_terminal() => return Ok(Step::Ignored),
            (_, TaskEvent::Requeue) => Pending,
        };
        Ok(Step::Moved(next))
    }
}

/// What can happen to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskEvent {
    /// The dispatcher published (or republished) the task.
    Dispatched,
    /// A connector reported an outcome.
    Outcome(OutcomeClass),
    /// An operator asked to run a failed task again.
    Retry,
    /// The scheduler gave up waiting (time-out) or saw a retryable failure
    /// with attempts left, and queued the task for another attempt.
    Requeue,
    /// A retention period ended or a legal hold was released: the task runs
    /// again to erase what may now go.
    FollowUp,
}

/// The result of applying an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Moved(TaskState),
    Ignored,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event} a task that is {state}")]
pub struct IllegalTransition {
    pub state: TaskState,
    pub event: &'static str,
}

/// The status of a request, derived from its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    Received,
    InProgress,
    Completed,
    CompletedWithExemptions,
    Failed,
}

impl RequestStatus {
    pub const ALL: [RequestStatus; 5] =
        [Self::Received, Self::InProgress, Self::Completed, Self::CompletedWithExemptions, Self::Failed];

    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::CompletedWithExemptions | Self::Failed)
    }

    /// Closed for good: the request's data key may be destroyed. A
    /// `failed` request keeps its key so that an operator can retry it, and
    /// one `completed_with_exemptions` keeps it for its follow-ups.
    pub fn is_closed(self) -> bool {
        self == Self::Completed
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::CompletedWithExemptions => "completed_with_exemptions",
            Self::Failed => "failed",
        }
    }

    /// The status that `tasks` imply, given the `current` one. Never moves
    /// backwards; `completed` and `failed` are left only through
    /// [`Self::reopen`]. A request `completed_with_exemptions` stays so
    /// while follow-ups run, and becomes `completed` once nothing is kept.
    /// It was answered: a follow-up that fails, years later, is a failed
    /// task for an operator to retry, not a request that goes back to
    /// unanswered (overdue, off the suppression list, without its
    /// certificate).
    pub fn next(self, tasks: &[TaskState]) -> RequestStatus {
        if matches!(self, Self::Completed | Self::Failed) {
            return self;
        }
        if tasks.iter().all(|t| t.is_terminal()) {
            if tasks.contains(&TaskState::Failed) {
                // Still answered, and its key kept for the retry.
                if self == Self::CompletedWithExemptions {
                    self
                } else {
                    RequestStatus::Failed
                }
            } else if tasks.iter().any(|t| t.is_exempted()) {
                RequestStatus::CompletedWithExemptions
            } else {
                RequestStatus::Completed
            }
        } else if self == RequestStatus::CompletedWithExemptions {
            self
        } else if self == RequestStatus::InProgress || tasks.iter().any(|t| *t != TaskState::Pending) {
            RequestStatus::InProgress
        } else {
            RequestStatus::Received
        }
    }

    /// An operator retry of a task of a failed request reopens it.
    pub fn reopen(self) -> Result<RequestStatus, IllegalTransition> {
        match self {
            Self::Failed | Self::InProgress => Ok(Self::InProgress),
            _ => Err(IllegalTransition { state: TaskState::Succeeded, event: "retry" }),
        }
    }
}

macro_rules! text_enum {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                <$t>::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| format!("unknown {} {s:?}", stringify!($t)))
            }
        }
    };
}

text_enum!(TaskState);
text_enum!(RequestStatus);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event() -> impl Strategy<Value = TaskEvent> {
        prop_oneof![
            Just(TaskEvent::Dispatched),
            Just(TaskEvent::Retry),
            Just(TaskEvent::Requeue),
            Just(TaskEvent::FollowUp),
            Just(TaskEvent::Outcome(OutcomeClass::Succeeded)),
            Just(TaskEvent::Outcome(OutcomeClass::Retained)),
            Just(TaskEvent::Outcome(OutcomeClass::Failed)),
            Just(TaskEvent::Outcome(OutcomeClass::Accepted)),
        ]
    }

    /// A deliberately simple reference model of the task machine.
    fn model(state: TaskState, event: TaskEvent) -> Option<TaskState> {
        match event {
            TaskEvent::Retry => (state == TaskState::Failed).then_some(TaskState::Pending),
            TaskEvent::FollowUp if state.is_exempted() => Some(TaskState::Pending),
            TaskEvent::FollowUp => Some(state),
            _ if state.is_terminal() => Some(state),
            TaskEvent::Requeue => Some(TaskState::Pending),
            TaskEvent::Dispatched => Some(TaskState::Dispatched),
            TaskEvent::Outcome(OutcomeClass::Succeeded) => Some(TaskState::Succeeded),
            TaskEvent::Outcome(OutcomeClass::Retained) => Some(TaskState::Retained),
            TaskEvent::Outcome(OutcomeClass::Failed) => Some(TaskState::Failed),
            TaskEvent::Outcome(OutcomeClass::Accepted) => Some(TaskState::Accepted),
        }
    }

    proptest! {
        #[test]
        fn task_machine_matches_model(events in prop::collection::vec(event(), 0..40)) {
            let mut state = TaskState::Pending;
            for e in events {
                let expected = model(state, e);
                match state.apply(e) {
                    Ok(Step::Moved(next)) => { prop_assert_eq!(Some(next), expected); state = next; }
                    Ok(Step::Ignored) => prop_assert_eq!(Some(state), expected),
                    Err(_) => prop_assert_eq!(expected, None),
                }
            }
        }

        #[test]
        fn terminal_task_states_ignore_outcomes_and_dispatches(
            events in prop::collection::vec(event(), 1..40),
        ) {
            for start in TaskState::ALL.into_iter().filter(|s| s.is_terminal()) {
                for e in events.iter().filter(|e| !matches!(e, TaskEvent::Retry | TaskEvent::FollowUp)) {
                    prop_assert_eq!(start.apply(*e), Ok(Step::Ignored));
                }
            }
        }

        #[test]
        fn request_status_is_monotonic_and_final_is_final(
            steps in prop::collection::vec(prop::collection::vec(0usize..7, 0..6), 1..20),
        ) {
            let rank = |s: RequestStatus| match s {
                RequestStatus::Received => 0,
                RequestStatus::InProgress => 1,
                _ => 2,
            };
            let mut status = RequestStatus::Received;
            for tasks in steps {
                let tasks: Vec<TaskState> = tasks.into_iter().map(|i| TaskState::ALL[i]).collect();
                let next = status.next(&tasks);
                prop_assert!(rank(next) >= rank(status));
                if matches!(status, RequestStatus::Completed | RequestStatus::Failed) {
                    prop_assert_eq!(next, status);
                }
                if !status.is_final() && !tasks.is_empty() && tasks.iter().all(|t| t.is_terminal()) {
                    prop_assert!(next.is_final());
                }
                status = next;
            }
        }
    }

    #[test]
    fn request_outcomes() {
        use TaskState::*;
        let s = RequestStatus::Received;
        assert_eq!(s.next(&[Pending, Pending]), RequestStatus::Received);
        assert_eq!(s.next(&[Dispatched, Pending]), RequestStatus::InProgress);
        assert_eq!(s.next(&[Succeeded, Succeeded]), RequestStatus::Completed);
        assert_eq!(s.next(&[Succeeded, Retained]), RequestStatus::CompletedWithExemptions);
        assert_eq!(s.next(&[Failed, Retained]), RequestStatus::Failed);
        assert_eq!(s.next(&[Succeeded, Held]), RequestStatus::CompletedWithExemptions);
        // follow-ups: exemptions stay while one runs, then completed; a
        // follow-up that fails leaves the request answered, its key kept
        let cwe = RequestStatus::CompletedWithExemptions;
        assert_eq!(cwe.next(&[Succeeded, Pending]), cwe);
        assert_eq!(cwe.next(&[Succeeded, Succeeded]), RequestStatus::Completed);
        assert_eq!(cwe.next(&[Succeeded, Retained]), cwe);
        assert_eq!(cwe.next(&[Failed, Retained]), cwe);
        assert_eq!(cwe.next(&[Succeeded, Failed]), cwe, "not completed: the failed follow-up kept data");
        assert!(!cwe.is_closed() && RequestStatus::Completed.is_closed());
        assert_eq!(TaskState::Retained.apply(TaskEvent::FollowUp), Ok(Step::Moved(Pending)));
        assert_eq!(TaskState::Held.apply(TaskEvent::FollowUp), Ok(Step::Moved(Pending)));
        assert_eq!(TaskState::Succeeded.apply(TaskEvent::FollowUp), Ok(Step::Ignored));
        assert_eq!(RequestStatus::InProgress.next(&[Pending]), RequestStatus::InProgress);
        assert_eq!(RequestStatus::Failed.reopen(), Ok(RequestStatus::InProgress));
        assert!(RequestStatus::Completed.reopen().is_err());
    }

    #[test]
    fn keys_are_served_for_work_still_asked_for() {
        use TaskState::*;
        // Attempt 2 was published last.
        assert!(Dispatched.serves_key(2, Some(2)));
        assert!(Dispatched.serves_key(2, Some(3)), "a republication read before it is recorded");
        assert!(!Dispatched.serves_key(2, Some(1)), "superseded");
        assert!(Accepted.serves_key(2, Some(2)) && Accepted.serves_key(2, Some(3)));
        assert!(Pending.serves_key(2, Some(3)), "the next attempt, read before it is recorded");
        assert!(!Pending.serves_key(2, Some(2)), "withdrawn: queued again");
        for settled in [Succeeded, Retained, Held, Failed] {
            assert!(!settled.serves_key(2, Some(2)) && !settled.serves_key(2, None), "{settled:?}");
        }
        assert!(Pending.serves_key(2, None) && Dispatched.serves_key(2, None));
    }

    #[test]
    fn names_round_trip() {
        for s in TaskState::ALL {
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), s);
        }
        for s in RequestStatus::ALL {
            assert_eq!(s.as_str().parse::<RequestStatus>().unwrap(), s);
        }
    }
}
