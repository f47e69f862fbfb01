//! Answering calls that arrive together with one round trip.
//!
//! A worker runs many tasks at once, and many of their calls into a store
//! are the same statement for a different subject. A [`Coalescer`] gathers
//! them: the first call of a group starts a round at once, and the calls
//! that arrive while a round is under way are answered together by the
//! next one (group commit). An idle worker pays no delay; a busy one makes
//! about one round trip per round of tasks instead of one per task.
//!
//! Rounds run as their own tokio tasks, so a caller that gives up does not
//! strand the others.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::connector::ConnectorError;

type Reply<R> = oneshot::Sender<Result<R, ConnectorError>>;

/// Gathers calls per group `G` into rounds of at most `max` items.
pub struct Coalescer<G, T, R> {
    max: usize,
    isolate: bool,
    groups: Arc<Mutex<HashMap<G, Queue<T, R>>>>,
}

struct Queue<T, R> {
    waiting: Vec<(T, Reply<R>)>,
    /// Whether a round runs; it takes what waits when it returns.
    running: bool,
}

impl<T, R> Default for Queue<T, R> {
    fn default() -> Self {
        Self { waiting: Vec::new(), running: false }
    }
}

impl<G, T, R> std::fmt::Debug for Coalescer<G, T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").field("max", &self.max).finish_non_exhaustive()
    }
}

impl<G, T, R> Coalescer<G, T, R>
where
    G: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + 'static,
    R: Send + 'static,
{
    /// Rounds of at most `max` items (at least 1).
    pub fn new(max: usize) -> Self {
        Self { max: max.max(1), isolate: false, groups: Arc::default() }
    }

    /// A round of several items that fails permanently runs again one item
    /// at a time, each caller getting its own answer: where one item can
    /// fail a shared statement (a row a foreign key or a trigger protects),
    /// the others must not fail with it.
    pub fn isolating_permanent_failures(mut self) -> Self {
        self.isolate = true;
        self
    }

    /// Answers `item` in a round of its group. `run` answers a round: one
    /// result per item, in order, or one error for all of them. Every call
    /// of a group should pass an equivalent `run`; a round uses the one of
    /// the call that started it.
    pub async fn call<F, Fut>(&self, group: G, item: T, run: F) -> Result<R, ConnectorError>
    where
        F: Fn(G, Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>, ConnectorError>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            let queue = groups.entry(group.clone()).or_default();
            queue.waiting.push((item, reply));
            !std::mem::replace(&mut queue.running, true)
        };
        if start {
            tokio::spawn(drain(self.groups.clone(), group, (self.max, self.isolate), run));
        }
        answer.await.unwrap_or_else(|_| Err(ConnectorError::retryable("the batched call was interrupted")))
    }
}

/// Forgets its group if a round panics: the calls waiting for it are
/// answered (as interrupted) when their replies drop, and the next call
/// starts a new round instead of waiting for one that never comes.
struct Abandon<G: Hash + Eq, T, R> {
    groups: Arc<Mutex<HashMap<G, Queue<T, R>>>>,
    group: G,
}

impl<G: Hash + Eq, T, R> Drop for Abandon<G, T, R> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.groups.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.group);
        }
    }
}

/// Runs rounds of `group` until nothing waits.
async fn drain<G, T, R, F, Fut>(
    groups: Arc<Mutex<HashMap<G, Queue<T, R>>>>,
    group: G,
    (max, isolate): (usize, bool),
    run: F,
) where
    G: Hash + Eq + Clone,
    T: Clone,
    F: Fn(G, Vec<T>) -> Fut,
    Fut: Future<Output = Result<Vec<R>, ConnectorError>>,
{
    let _abandon = Abandon { groups: groups.clone(), group: group.clone() };
    loop {
        let round: Vec<(T, Reply<R>)> = {
            let mut groups = groups.lock().unwrap_or_else(|e| e.into_inner());
            let Some(queue) = groups.get_mut(&group) else { return };
            if queue.waiting.is_empty() {
                groups.remove(&group);
                return;
            }
            let n = queue.waiting.len().min(max);
            queue.waiting.drain(..n).collect()
        };
        let (items, replies): (Vec<T>, Vec<Reply<R>>) = round.into_iter().unzip();
        let expected = items.len();
        let kept = (isolate && expected > 1).then(|| items.clone());
        match run(group.clone(), items).await {
            Ok(results) if results.len() == expected => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Ok(results) => {
                let e = ConnectorError::permanent(format!(
                    "a batched call answered {} items of {expected}",
                    results.len()
                ));
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
            Err(e) => match kept.filter(|_| !e.retryable) {
                Some(items) => {
                    for (item, reply) in items.into_iter().zip(replies) {
                        let alone = match run(group.clone(), vec![item]).await {
                            Ok(mut results) if results.len() == 1 => Ok(results.remove(0)),
                            Ok(results) => Err(ConnectorError::permanent(format!(
                                "a batched call answered {} items of 1",
                                results.len()
                            ))),
                            Err(e) => Err(e),
                        };
                        let _ = reply.send(alone);
                    }
                }
                None => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn calls_that_wait_share_a_round() {
        let rounds = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let coalescer = Arc::new(Coalescer::<&'static str, u32, u32>::new(4));
        let run = {
            let rounds = rounds.clone();
            move |_group: &'static str, items: Vec<u32>| {
                let rounds = rounds.clone();
                async move {
                    rounds.lock().unwrap().push(items.clone());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(items.into_iter().map(|i| i * 10).collect())
                }
            }
        };
        let mut calls = Vec::new();
        for i in 0..9 {
            let (c, run) = (coalescer.clone(), run.clone());
            calls.push(tokio::spawn(async move { c.call("t", i, run).await }));
            if i == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), Ok(i as u32 * 10), "each caller gets its own answer");
        }
        let rounds = rounds.lock().unwrap();
        assert_eq!(rounds[0], vec![0], "the first call does not wait for company");
        assert_eq!(rounds.iter().map(Vec::len).sum::<usize>(), 9);
        assert!(rounds.iter().all(|r| r.len() <= 4), "rounds are bounded: {rounds:?}");
        assert!(rounds.len() <= 4, "the eight that waited went in full rounds: {rounds:?}");
    }

    #[tokio::test]
    async fn an_error_reaches_every_caller_of_the_round_and_groups_are_apart() {
        let coalescer = Arc::new(Coalescer::<u8, u32, u32>::new(100));
        let runs = Arc::new(AtomicUsize::new(0));
        let run = {
            let runs = runs.clone();
            move |group: u8, items: Vec<u32>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if group == 1 {
                        Err(ConnectorError::retryable("store unavailable"))
                    } else {
                        Ok(items)
                    }
                }
            }
        };
        let calls: Vec<_> = (0..6u32)
            .map(|i| {
                let (c, run) = (coalescer.clone(), run.clone());
                tokio::spawn(async move { (i, c.call((i % 2) as u8, i, run).await) })
            })
            .collect();
        for call in calls {
            let (i, result) = call.await.unwrap();
            if i % 2 == 1 {
                assert_eq!(result, Err(ConnectorError::retryable("store unavailable")));
            } else {
                assert_eq!(result, Ok(i));
            }
        }
        assert!(runs.load(Ordering::SeqCst) >= 2, "one round per group at least");
        let wrong = Coalescer::<(), u32, u32>::new(10);
        let short = wrong.call((), 1, |_, _| async { Ok(Vec::new()) }).await;
        assert!(short.is_err_and(|e| !e.retryable), "a runner that loses an answer is a bug, not a retry");
    }

    /// One item that fails a shared statement for good (a row a foreign key
    /// protects, say) fails alone; a retryable failure still reaches all.
    #[tokio::test]
    async fn an_isolating_coalescer_fails_only_the_item_at_fault() {
        let coalescer = Arc::new(Coalescer::<(), u32, u32>::new(100).isolating_permanent_failures());
        let rounds = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let run = {
            let rounds = rounds.clone();
            move |_: (), items: Vec<u32>| {
                rounds.lock().unwrap().push(items.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if items.contains(&3) {
                        Err(ConnectorError::permanent("foreign key constraint violated"))
                    } else if items.contains(&99) {
                        Err(ConnectorError::retryable("deadlock detected"))
                    } else {
                        Ok(items.iter().map(|i| i * 10).collect())
                    }
                }
            }
        };
        let (c, r) = (coalescer.clone(), run.clone());
        let first = tokio::spawn(async move { c.call((), 0, r).await });
        tokio::time::sleep(Duration::from_millis(2)).await;
        let calls: Vec<_> = (1..6u32)
            .map(|i| {
                let (c, run) = (coalescer.clone(), run.clone());
                tokio::spawn(async move { (i, c.call((), i, run).await) })
            })
            .collect();
        assert_eq!(first.await.unwrap(), Ok(0));
        for call in calls {
            let (i, result) = call.await.unwrap();
            if i == 3 {
                assert!(result.is_err_and(|e| !e.retryable), "the item at fault fails");
            } else {
                assert_eq!(result, Ok(i * 10), "item {i} is answered on its own");
            }
        }
        assert!(rounds.lock().unwrap().contains(&vec![1, 2, 3, 4, 5]), "{:?}", rounds.lock().unwrap());
        let (c, r) = (coalescer.clone(), run.clone());
        let slow = tokio::spawn(async move { c.call((), 7, r).await });
        tokio::time::sleep(Duration::from_millis(2)).await;
        let (a, b) = tokio::join!(coalescer.call((), 99, run.clone()), coalescer.call((), 8, run.clone()));
        assert_eq!(slow.await.unwrap(), Ok(70));
        assert!(a.is_err_and(|e| e.retryable) && b.is_err_and(|e| e.retryable), "not split");
    }
}
