//! Each bundled spec end to end against a local server that implements the
//! vendor's documented requests and responses: authentication, rate
//! limiting, asynchronous job states and failures, and the conformance kit.

#[path = "../common/mod.rs"]
mod common;

mod amplitude;
mod braze;
mod hubspot;
mod klaviyo;
mod mailchimp;
mod mixpanel;
mod segment;
