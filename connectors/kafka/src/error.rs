//! Turning librdkafka errors into retryable or permanent [`ConnectorError`]s.
//!
//! Messages name the operation, the topic and librdkafka's error code; a
//! record's key or value never appears (delivery errors carry the message,
//! which is dropped here).

use lethe_connector::ConnectorError;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode as Code;

/// Classifies `err` from `op` (e.g. "reading") on `topic`, if any.
pub fn classify(op: &str, topic: Option<&str>, err: &KafkaError) -> ConnectorError {
    let what = match topic {
        Some(t) => format!("{op} topic {t}"),
        None => op.to_owned(),
    };
    let (retryable, detail) = match err {
        KafkaError::ClientCreation(e) => (false, format!("invalid client configuration: {e}")),
        KafkaError::ClientConfig(_, desc, key, _) => {
            (false, format!("invalid client property {key}: {desc}"))
        }
        KafkaError::Canceled => (true, "the client was shut down".to_owned()),
        e => match e.rdkafka_error_code() {
            Some(code) => (!is_permanent(code), code_text(code)),
            // The remaining variants carry librdkafka's text about the
            // client's own state, never a record.
            None => (true, format!("client error: {e}")),
        },
    };
    let message = format!("{what} failed: {detail}");
    if retryable {
        ConnectorError::retryable(message)
    } else {
        ConnectorError::permanent(message)
    }
}

/// Classifies a bare error code, e.g. one from a topic's metadata.
pub fn classify_code(op: &str, topic: &str, code: Code) -> ConnectorError {
    let message = format!("{op} topic {topic} failed: {}", code_text(code));
    if is_permanent(code) {
        ConnectorError::permanent(message)
    } else {
        ConnectorError::retryable(message)
    }
}

fn code_text(code: Code) -> String {
    match code {
        Code::UnknownTopicOrPartition | Code::UnknownTopic => "the topic does not exist".to_owned(),
        c => format!("{c} ({c:?})"),
    }
}

/// Errors that will not go away by themselves: a missing topic, denied
/// access, failed authentication, a configuration the broker rejects, a
/// feature it lacks. Everything else (transport, time-outs, leadership
/// changes, throttling, a broker starting up) is retryable.
fn is_permanent(code: Code) -> bool {
    matches!(
        code,
        Code::UnknownTopicOrPartition
            | Code::UnknownTopic
            | Code::UnknownPartition
            | Code::InvalidTopic
            | Code::TopicAuthorizationFailed
            | Code::ClusterAuthorizationFailed
            | Code::GroupAuthorizationFailed
            | Code::TransactionalIdAuthorizationFailed
            | Code::DelegationTokenAuthorizationFailed
            | Code::SaslAuthenticationFailed
            | Code::Authentication
            | Code::UnsupportedSASLMechanism
            | Code::IllegalSASLState
            | Code::SecurityDisabled
            | Code::SSL
            | Code::InvalidConfig
            | Code::InvalidArgument
            | Code::InvalidRequest
            | Code::InvalidRequiredAcks
            | Code::UnsupportedVersion
            | Code::UnsupportedFeature
            | Code::UnsupportedForMessageFormat
            | Code::NotImplemented
            | Code::PolicyViolation
            | Code::MessageSizeTooLarge
            | Code::InvalidMessageSize
            | Code::InvalidRecord
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_errors_are_retryable() {
        for code in [
            Code::AllBrokersDown,
            Code::BrokerTransportFailure,
            Code::OperationTimedOut,
            Code::MessageTimedOut,
        ] {
            let e = classify("reading", Some("t"), &KafkaError::MetadataFetch(code));
            assert!(e.retryable, "{code:?}");
        }
        assert!(classify("writing", None, &KafkaError::MessageProduction(Code::NotEnoughReplicas)).retryable);
    }

    #[test]
    fn missing_topics_and_denied_access_are_permanent() {
        let e = classify_code("reading", "orders", Code::UnknownTopicOrPartition);
        assert!(!e.retryable);
        assert_eq!(e.message, "reading topic orders failed: the topic does not exist");
        for code in [Code::TopicAuthorizationFailed, Code::SaslAuthenticationFailed, Code::Authentication] {
            assert!(!classify("reading", Some("t"), &KafkaError::MetadataFetch(code)).retryable, "{code:?}");
        }
        assert!(!classify("creating a client", None, &KafkaError::ClientCreation("bad".into())).retryable);
    }
}
