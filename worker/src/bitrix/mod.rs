//! The Bitrix24 REST client (the worker's alone): [`client`] makes one request,
//! [`error`] classifies what came back, [`session`] makes calls for a stored portal
//! resilient (budget, backoff, refresh, the portal's lifecycle answers), [`oauth`]
//! talks to each portal's authorization server, [`hosts`] keeps every request inside
//! `B24_ALLOWED_HOSTS`.

pub mod client;
pub mod error;
pub mod hosts;
pub mod limiter;
pub mod metrics;
pub mod oauth;
pub mod retry;
pub mod session;

pub use client::{Answer, RestClient};
pub use error::{B24Error, ErrorClass};
pub use hosts::AllowedHosts;
pub use metrics::B24Metrics;
pub use session::{Auth, Bitrix, Session};
