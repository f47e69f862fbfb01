//! What this process saw of each request's deletion jobs, per subject, for
//! APIs that delete by job (whether or not a lookup of the subject also
//! shows the deletion: it shows the subject until the job has run).
//!
//! Subjects are remembered per request by a keyed SHA-256 (a random key per
//! process), never by value, for at most a day and at most [`CAPACITY`] of
//! them: long enough that a redelivered or retried task follows the job
//! already submitted, or reports nothing once it finished, instead of
//! starting another. Another request for the same subject (data brought
//! back by a restored backup, say) submits a job of its own.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use lethe_connector::lethe_core::RequestId;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// Most subjects remembered.
pub const CAPACITY: usize = 10_000;

/// How long a subject is remembered.
pub const TTL: Duration = Duration::from_secs(24 * 3600);

/// What was seen of a subject's job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// This job runs for it.
    Running(String),
    /// Its job finished.
    Finished,
}

type Key = [u8; 32];

/// Entries by key, and keys oldest first.
#[derive(Default)]
struct Entries {
    map: HashMap<Key, (Seen, Instant)>,
    order: VecDeque<Key>,
}

/// Subjects' jobs by keyed hash; a no-op when disabled.
pub struct Memo {
    enabled: bool,
    salt: [u8; 32],
    entries: Mutex<Entries>,
}

impl Memo {
    pub fn new(enabled: bool) -> Self {
        Self { enabled, salt: rand::random(), entries: Mutex::default() }
    }

    fn key(&self, request: RequestId, subject: &str) -> Key {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(request.0.as_bytes());
        h.update(subject.as_bytes());
        h.finalize().into()
    }

    pub fn get(&self, request: RequestId, subject: &str) -> Option<Seen> {
        if !self.enabled {
            return None;
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (seen, at) = entries.map.get(&self.key(request, subject))?;
        (at.elapsed() < TTL).then(|| seen.clone())
    }

    fn put(&self, request: RequestId, subject: &str, seen: Option<Seen>) {
        if !self.enabled {
            return;
        }
        let key = self.key(request, subject);
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let Entries { map, order } = &mut *guard;
        match seen {
            None => {
                map.remove(&key);
            }
            Some(seen) => {
                if map.insert(key, (seen, Instant::now())).is_none() {
                    order.push_back(key);
                }
            }
        }
        // The oldest go first; a key forgotten and stored again may be
        // dropped early, which only costs a lookup of its job.
        while map.len() > CAPACITY || order.len() > 2 * CAPACITY {
            let Some(old) = order.pop_front() else { break };
            map.remove(&old);
        }
    }

    pub fn running(&self, request: RequestId, subject: &str, job_id: &str) {
        self.put(request, subject, Some(Seen::Running(job_id.to_owned())));
    }

    pub fn finished(&self, request: RequestId, subject: &str) {
        self.put(request, subject, Some(Seen::Finished));
    }

    pub fn forget(&self, request: RequestId, subject: &str) {
        self.put(request, subject, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_by_request_and_subject_and_only_when_enabled() {
        let (m, r) = (Memo::new(true), RequestId::new());
        m.running(r, "a@example.com", "j1");
        assert_eq!(m.get(r, "a@example.com"), Some(Seen::Running("j1".into())));
        assert_eq!(m.get(r, "b@example.com"), None);
        m.finished(r, "a@example.com");
        assert_eq!(m.get(r, "a@example.com"), Some(Seen::Finished));
        assert_eq!(m.get(RequestId::new(), "a@example.com"), None, "another request submits its own job");
        m.forget(r, "a@example.com");
        assert_eq!(m.get(r, "a@example.com"), None);
        let off = Memo::new(false);
        off.finished(r, "a@example.com");
        assert_eq!(off.get(r, "a@example.com"), None);
    }

    #[test]
    fn capacity_is_bounded() {
        let (m, r) = (Memo::new(true), RequestId::new());
        for i in 0..CAPACITY + 10 {
            m.finished(r, &i.to_string());
        }
        assert_eq!(m.get(r, "0"), None);
        assert_eq!(m.get(r, &(CAPACITY + 9).to_string()), Some(Seen::Finished));
        assert!(m.entries.lock().unwrap().map.len() <= CAPACITY);
    }
}
