//! A client-side rate limit shared by every task of one connector: at most
//! `requests` requests start in any window of `per`, plus a small margin so
//! that network jitter does not make the server count more in its window.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// A sliding-window limiter; waiting callers reserve their slot in order.
#[derive(Debug)]
pub struct RateLimiter {
    requests: usize,
    per: Duration,
    /// Start times of the last `requests` requests, oldest first (some may
    /// be reserved in the future).
    starts: Mutex<VecDeque<Instant>>,
}

impl RateLimiter {
    pub fn new(requests: u32, per: Duration) -> Self {
        let requests = requests.max(1) as usize;
        let per = per + (per / 20).min(Duration::from_millis(100));
        Self { requests, per, starts: Mutex::new(VecDeque::with_capacity(requests)) }
    }

    /// Waits until a request may start.
    pub async fn acquire(&self) {
        let at = {
            let mut starts = self.starts.lock().await;
            let now = Instant::now();
            let at = if starts.len() < self.requests {
                now
            } else {
                let oldest = starts.pop_front().unwrap_or(now);
                (oldest + self.per).max(now)
            };
            starts.push_back(at);
            at
        };
        if at > Instant::now() {
            tracing::trace!(wait_ms = (at - Instant::now()).as_millis() as u64, "client-side rate limit");
            tokio::time::sleep_until(at).await;
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
                l.acquire().await;
                started.elapsed()
            }));
        }
        let mut times = Vec::new();
        for h in handles {
            times.push(h.await.unwrap());
        }
        times.sort();
        // 3 at once, 3 after one window, 1 after two.
        assert!(times[2] < Duration::from_millis(190), "{times:?}");
        assert!(times[3] >= Duration::from_millis(195), "{times:?}");
        assert!(times[6] >= Duration::from_millis(395), "{times:?}");
    }
}
