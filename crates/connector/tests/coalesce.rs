//! A [`Coalescer`] round that panics, in a process of its own: the panic
//! must not share a test process with the tests that read the log.

use std::time::Duration;

use lethe_connector::Coalescer;

/// A round that panics answers its callers as interrupted (retryable), and
/// the group's next call runs a round of its own.
#[tokio::test]
async fn a_panicking_round_does_not_strand_its_group() {
    let coalescer = Coalescer::<u8, u32, u32>::new(10);
    let panics = |_: u8, _: Vec<u32>| async { panic!("a bug in the store's code") };
    let first = coalescer.call(1, 1, panics).await.unwrap_err();
    assert!(first.retryable, "{first:?}");
    let next =
        tokio::time::timeout(Duration::from_secs(5), coalescer.call(1, 2, |_, items| async { Ok(items) }));
    assert_eq!(next.await.expect("the group is not stuck"), Ok(2));
}
