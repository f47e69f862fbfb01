//! The in-process bus of the embedded default: bounded channels per system
//! and one for results. Nothing survives a restart, which is why the
//! coordinator republishes in-flight tasks from its store on start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

    /// Messages dead-lettered so far (their reasons and sizes, not bodies).
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.inner.dead_letters.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct ChannelConsumer<T> {
    rx: mpsc::Receiver<T>,
    next_offset: i64,
    source: String,
}

#[async_trait]
impl<T: Send> Consumer<T> for ChannelConsumer<T> {
    async fn recv(&mut self) -> Option<Delivery<T>> {
        let message = self.rx.recv().await?;
        let position = Position { partition: 0, offset: self.next_offset };
        self.next_offset += 1;
        Some(Delivery { message: Ok(message), position })
    }

    async fn ack(&mut self, _position: Position) -> Result<(), BusError> {
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
        Ok(Box::new(ChannelConsumer { rx, next_offset: 0, source: format!("in-process tasks of {system}") }))
    }

    async fn publish_result(&self, result: &ResultMessage) -> Result<(), BusError> {
        let tx = self.inner.results.lock().unwrap_or_else(|e| e.into_inner()).0.clone();
        tx.send(result.clone()).await.map_err(|_| BusError::Closed)
    }

    async fn result_consumer(&self) -> Result<Box<dyn Consumer<ResultMessage>>, BusError> {
        let mut results = self.inner.results.lock().unwrap_or_else(|e| e.into_inner());
        let rx = take_receiver(&mut results.1, "the results stream")?;
        Ok(Box::new(ChannelConsumer { rx, next_offset: 0, source: "in-process results".into() }))
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
