//! Lethe connector for REST APIs declared in files: marketing and analytics
//! SaaS whose deletion API is a few HTTP requests.
//!
//! A [`Spec`] (TOML) declares one API: its base URL and authentication
//! (bearer, basic, an API-key header, or OAuth2 client credentials with the
//! token cached and refreshed), the steps that erase one subject (e.g. look
//! the contact up by email, then delete it by id), with request templates
//! over the subject's identifiers and derived values (`{subject|lower|md5}`),
//! each step's status mapping (`not_found = [404]`), a client-side rate
//! limit, and for an API that deletes asynchronously the job to follow
//! (submit, then poll a status endpoint until done or failed, within a
//! maximum wait). Verification re-queries the API where it offers a lookup;
//! where the job status is the only evidence the spec says so, and verify
//! counts 0 only once the job finished.
//!
//! Bundled specs follow each vendor's documented deletion API: Mailchimp,
//! HubSpot, Braze and Klaviyo (marketing), Segment, Amplitude and Mixpanel
//! (analytics). A system selects one with `spec = "mailchimp"` or brings
//! its own with `spec_file`, and supplies the settings the spec names
//! ([`HttpConfig`]).
//!
//! Identifier values appear only in requests: logs and errors name the step
//! and the status, never a URL or a body.

mod client;
mod config;
mod connector;
mod duration;
mod error;
mod flow;
mod kind;
mod memo;
mod ratelimit;
pub mod spec;
mod template;

pub use config::{HttpConfig, Resolved};
pub use connector::HttpConnector;
pub use kind::HttpKind;
pub use spec::{Spec, BUNDLED};
