//! A client-side rate limit shared by every task of one connector: at most
//! `requests` requests in any window of `per`, as the server counts them.
//!
//! The server counts a request when it arrives, which the client cannot
//! see: a request on a new connection (a TCP and TLS handshake first)
//! arrives later after its start than one on a warm connection, so spacing
//! the starts `per` apart lets the server see more than `requests` in its
//! window. Each request therefore holds one of `requests` slots from its
//! start until `per` after its answer: it arrived before it was answered,
//! so the request that takes its slot next starts, and arrives, at least
//! `per` after it. Whatever the network's delays, no window of the server
//! holds more than `requests` of them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// `requests` slots, each given back `per` after its request ended;
/// waiting callers get them in order.
#[derive(Debug)]
pub struct RateLimiter {
    slots: Arc<Semaphore>,
    per: Duration,
}

/// A request's place in the limit: hold it until the answer has arrived
/// (or the request failed); dropping it gives the slot back `per` later.
#[derive(Debug)]
#[must_use = "the slot is given back as soon as it is dropped"]
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    per: Duration,
}

impl RateLimiter {
    pub fn new(requests: u32, per: Duration) -> Self {
        Self { slots: Arc::new(Semaphore::new(requests.max(1) as usize)), per }
    }

    /// Waits until a request may start.
    pub async fn acquire(&self) -> Slot {
        let asked = Instant::now();
        // The semaphore is never closed, so this always yields a permit.
        let permit = self.slots.clone().acquire_owned().await.ok();
        let waited = asked.elapsed();
        if waited >= Duration::from_millis(1) {
            tracing::trace!(wait_ms = waited.as_millis() as u64, "client-side rate limit");
        }
        Slot { permit, per: self.per }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else { return };
        // Without a runtime (the process is ending) nobody can wait for it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let per = self.per;
            runtime.spawn(async move {
                tokio::time::sleep(per).await;
                drop(permit);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_the_window() {
        let limiter = Arc::new(RateLimiter::new(3, Duration::from_millis(200)));
        let started = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..7 {
            let l = limiter.clone();
            handles.push(tokio::spawn(async move {
                let slot = l.acquire().await;
                let at = started.elapsed();
                drop(slot);
                at
            }));
        }
        let mut times = Vec::new();
        for h in handles {
            times.push(h.await.unwrap());
        }
        times.sort();
        // 3 at once, 3 after one window, 1 after two.
        assert!(times[2] < Duration::from_millis(190), "{times:?}");
        assert!(times[3] >= Duration::from_millis(200), "{times:?}");
        assert!(times[6] >= Duration::from_millis(400), "{times:?}");
    }

    /// A slot counts from its request's end: a slow answer pushes the next
    /// request that needs its slot back by as long.
    #[tokio::test]
    async fn the_window_counts_from_the_answer() {
        let limiter = RateLimiter::new(1, Duration::from_millis(200));
        let started = Instant::now();
        let slot = limiter.acquire().await;
        tokio::time::sleep(Duration::from_millis(300)).await; // a slow answer
        drop(slot);
        let _next = limiter.acquire().await;
        assert!(started.elapsed() >= Duration::from_millis(500), "{:?}", started.elapsed());
    }
}
