//! `lethe dlq list|replay`: the dead-letter topic of the Kafka bus.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use lethe_bus::{Bus as _, KafkaBus, ResultMessage};
use lethe_coordinator::ingest;

use crate::config::{resolve_placeholders, BusConfig, Config};

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Count the dead letters by source and reason (reads from the start;
    /// moves no offset).
    List,
    /// Publish dead-lettered results to the results topic again, e.g. after
    /// fixing what made them fail. Each letter is handled once (consumer
    /// group `<namespace>.dlq-replay`); task letters (a worker's), results
    /// that still cannot be decoded and results that matched no task (their
    /// texts withheld: they would be refused again) are skipped and counted.
    Replay {
        /// Show what the next replay would do (from the replay group's
        /// position); publish nothing, move no offset.
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    let BusConfig::Kafka(kafka) = &config.bus else {
        bail!("the dead-letter topic exists only with the Kafka bus; the in-process bus logs dead letters");
    };
    let mut kafka = kafka.clone();
    kafka.brokers = resolve_placeholders(&kafka.brokers).context("bus.brokers")?;
    for value in kafka.client.values_mut() {
        *value = resolve_placeholders(value).context("bus.client")?;
    }
    let namespace = kafka.namespace.clone();
    let systems: Vec<String> = config.systems.iter().map(|s| s.name.clone()).collect();
    let bus = KafkaBus::connect(kafka, &systems).await.context("cannot reach Kafka")?;
    let idle = Duration::from_secs(3);
    match command {
        DlqCommand::List => {
            let group = format!("{namespace}.dlq-list-{}", uuid::Uuid::new_v4().simple());
            // A throwaway group that never commits: listing changes nothing.
            let letters = bus.dead_letters(&group, idle).await?.letters;
            let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
            for l in &letters {
                *counts.entry((l.source.clone(), grouped(&l.reason).to_owned())).or_default() += 1;
            }
            println!("{} dead letters", letters.len());
            for ((source, reason), n) in counts {
                println!("{n:>6}  {source}  {reason}");
            }
        }
        DlqCommand::Replay { dry_run } => {
            // The dry run reads from where the next replay would start, and
            // commits nothing.
            let group = format!("{namespace}.dlq-replay");
            let read = bus.dead_letters(&group, idle).await?;
            let results_topic = format!("{namespace}.results");
            let (mut replayed, mut tasks, mut skipped, mut unmatched) = (0, 0, 0, 0);
            for l in &read.letters {
                if l.source != results_topic {
                    tasks += 1;
                    continue;
                }
                if [ingest::UNKNOWN_TASK, ingest::MISMATCHED].contains(&l.reason.as_str()) {
                    unmatched += 1;
                    continue;
                }
                match ResultMessage::decode(&l.payload) {
                    Ok(result) => {
                        if !dry_run {
                            bus.publish_result(&result).await?;
                        }
                        replayed += 1;
                    }
                    Err(_) => skipped += 1,
                }
            }
            // Only now are the letters marked handled: a replay that failed
            // part-way (the `?` above) leaves them all for the next one, and
            // replaying a result twice changes nothing.
            if !dry_run {
                read.commit()?;
            }
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!(
                "{verb} {replayed} results; skipped {skipped} results that still cannot be decoded, \
                 {unmatched} that matched no task (kept to be looked at: they would be refused again) \
                 and {tasks} task letters (a worker's: replay handles results only)"
            );
        }
    }
    Ok(())
}

/// A reason as dead letters are counted by: without the place in the
/// message (`… at line 1 column 157`), so that one fault is one line
/// however long the messages it hit.
fn grouped(reason: &str) -> &str {
    if let Some((head, place)) = reason.rsplit_once(" at line ") {
        if let Some((line, column)) = place.split_once(" column ") {
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if digits(line) && digits(column) {
                return head;
            }
        }
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::grouped;

    #[test]
    fn reasons_are_counted_without_their_place() {
        let a = "invalid envelope: a value of the wrong type or format at line 1 column 157";
        let b = "invalid envelope: a value of the wrong type or format at line 1 column 98";
        assert_eq!(grouped(a), grouped(b));
        assert_eq!(grouped(a), "invalid envelope: a value of the wrong type or format");
        for kept in ["result refers to an unknown task", "odd at line one column two", "at line 3 column"] {
            assert_eq!(grouped(kept), kept);
        }
    }
}
