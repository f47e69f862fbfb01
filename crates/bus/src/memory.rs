//! The in-process bus of the embedded default: bounded channels per system
//! and one for results. Nothing survives a restart, which is why the
//! coordinator republishes in-flight tasks from its store on start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::{Bus, BusError, Consumer, Delivery, Position, PublishError, ResultMessage, TaskMessage};

const CAPACITY: usize = 4096;

type Channel<T> = (mpsc::Sender<T>, Option<mpsc::Receiver<T>>);

/// An in-memory [`Bus`]. Each stream has exactly one consumer.
#[derive(Debug, Clone)]
pub struct InProcessBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tasks: Mutex<HashMap<String, Channel<TaskMessage>>>,
    results: Mutex<Channel<ResultMessage>>,
    dead_letters: Mutex<Vec<DeadLetter>>,
    /// Results published (or being published) so far.
    results_published: AtomicI64,
    /// Results acknowledged by their consumer, counted from the first.
    results_acked: Arc<AtomicI64>,
}

/// A message the in-process bus set aside.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub source: String,
    pub reason: String,
    pub size: usize,
}

impl Default for InProcessBus {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(CAPACITY);
        Self {
            inner: Arc::new(Inner {
                tasks: Mutex::new(HashMap::new()),
                results: Mutex::new((tx, Some(rx))),
                dead_letters: Mutex::new(Vec::new()),
                results_published: AtomicI64::new(0),
                results_acked: Arc::new(AtomicI64::new(0)),
            }),
        }
    }
}

impl InProcessBus {
    pub fn new() -> Self {
        Self::default()
    }

    fn task_sender(&self, system: &str) -> mpsc::Sender<TaskMessage> {
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks
            .entry(system.to_owned())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(CAPACITY);
                (tx, Some(rx))
            })
            .0
            .clone()
    }

    /// Waits until every result published so far has been acknowledged by
    /// the results' consumer (for the coordinator's ingest: applied to the
    /// state store), or `limit` has passed; says whether they all were.
    /// Nothing on this bus survives the process, so a process stopping
    /// waits for this before it exits.
    pub async fn results_acknowledged(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let published = self.inner.results_published.load(Ordering::SeqCst);
            if self.inner.results_acked.load(Ordering::SeqCst) >= published {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Messages dead-lettered so far (their reasons and sizes, not bodies).
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.inner.dead_letters.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct ChannelConsumer<T> {
    rx: mpsc::Receiver<T>,
    next_offset: i64,
    source: String,
    /// Where acknowledgements are counted (1 + the highest offset), if anywhere.
    acked: Option<Arc<AtomicI64>>,
}

#[async_trait]
impl<T: Send> Consumer<T> for ChannelConsumer<T> {
    async fn recv(&mut self) -> Option<Delivery<T>> {
        let message = self.rx.recv().await?;
        let position = Position { partition: 0, offset: self.next_offset };
        self.next_offset += 1;
        Some(Delivery { message: Ok(message), position })
    }

    async fn ack(&mut self, position: Position) -> Result<(), BusError> {
        if let Some(acked) = &self.acked {
            acked.fetch_max(position.offset + 1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn source(&self) -> String {
        self.source.clone()
    }
}

fn take_receiver<T>(slot: &mut Option<mpsc::Receiver<T>>, what: &str) -> Result<mpsc::Receiver<T>, BusError> {
    slot.take().ok_or_else(|| BusError::Config(format!("{what} already has a consumer in this process")))
}

#[async_trait]
impl Bus for InProcessBus {
    async fn publish_tasks(&self, tasks: &[TaskMessage]) -> Result<(), PublishError> {
        for (i, task) in tasks.iter().enumerate() {
            if self.task_sender(&task.system).send(task.clone()).await.is_err() {
                return Err(PublishError { error: BusError::Closed, failed: (i..tasks.len()).collect() });
            }
        }
        Ok(())
    }

    async fn task_consumer(&self, system: &str) -> Result<Box<dyn Consumer<TaskMessage>>, BusError> {
        self.task_sender(system);
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut tasks.get_mut(system).ok_or(BusError::Closed)?.1;
        let rx = take_receiver(slot, &format!("system {system}"))?;
        Ok(Box::new(ChannelConsumer {
            rx,
            next_offset: 0,
            source: format!("in-process tasks of {system}"),
            acked: None,
        }))
    }

    async fn publish_result(&self, result: &ResultMessage) -> Result<(), BusError> {
        /// Counts a result as published while its send is under way, and
        /// takes it back unless the send completed: also when the send is
        /// dropped half-way (a worker cut off at the end of its grace).
        struct Sending<'a>(&'a AtomicI64, bool);
        impl Drop for Sending<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
        let tx = self.inner.results.lock().unwrap_or_else(|e| e.into_inner()).0.clone();
        self.inner.results_published.fetch_add(1, Ordering::SeqCst);
        let mut sending = Sending(&self.inner.results_published, false);
        let sent = tx.send(result.clone()).await;
        sending.1 = sent.is_ok();
        sent.map_err(|_| BusError::Closed)
    }

    async fn result_consumer(&self) -> Result<Box<dyn Consumer<ResultMessage>>, BusError> {
        let mut results = self.inner.results.lock().unwrap_or_else(|e| e.into_inner());
        let rx = take_receiver(&mut results.1, "the results stream")?;
        Ok(Box::new(ChannelConsumer {
            rx,
            next_offset: 0,
            source: "in-process results".into(),
            acked: Some(self.inner.results_acked.clone()),
        }))
    }

    async fn dead_letter(&self, source: &str, raw: &[u8], reason: &str) -> Result<(), BusError> {
        tracing::warn!(source, reason, size = raw.len(), "message dead-lettered");
        self.inner.dead_letters.lock().unwrap_or_else(|e| e.into_inner()).push(DeadLetter {
            source: source.into(),
            reason: reason.into(),
            size: raw.len(),
        });
        Ok(())
    }

    fn is_durable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use lethe_core::{Outcome, RequestId, TaskId};

    use super::*;

    fn result() -> ResultMessage {
        ResultMessage {
            version: crate::ENVELOPE_VERSION,
            task_id: TaskId::new(),
            request_id: RequestId::new(),
            system: "crm".into(),
            attempt: 1,
            outcome: Outcome::NotFound { residual: Some(0) },
            reported_at: Utc::now(),
            worker: None,
            task_issued_at: None,
        }
    }

    #[tokio::test]
    async fn a_stopping_process_can_tell_its_results_were_all_applied() {
        let bus = InProcessBus::new();
        let short = Duration::from_millis(30);
        assert!(bus.results_acknowledged(short).await, "nothing published");
        let mut consumer = bus.result_consumer().await.unwrap();
        bus.publish_result(&result()).await.unwrap();
        bus.publish_result(&result()).await.unwrap();
        assert!(!bus.results_acknowledged(short).await, "two results not yet received");
        let first = consumer.recv().await.unwrap();
        let second = consumer.recv().await.unwrap();
        consumer.ack(first.position).await.unwrap();
        assert!(!bus.results_acknowledged(short).await, "the second not yet acknowledged");
        consumer.ack(second.position).await.unwrap();
        assert!(bus.results_acknowledged(short).await);

        // A send cut off half-way (the channel full, the task aborted)
        // is not counted as published.
        let full = InProcessBus::new();
        let _consumer = full.result_consumer().await.unwrap();
        for _ in 0..CAPACITY {
            full.publish_result(&result()).await.unwrap();
        }
        let blocked = tokio::time::timeout(short, full.publish_result(&result())).await;
        assert!(blocked.is_err(), "the channel is full");
        let published = full.inner.results_published.load(Ordering::SeqCst);
        assert_eq!(published, CAPACITY as i64);
    }
}
