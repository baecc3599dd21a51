//! Library shared by the b24-pipeline binaries: the message that crosses the broker
//! ([`envelope`]), how Bitrix24 bodies are read ([`form`], [`event`]), configuration,
//! AMQP topology and confirmed publishing,
//! PostgreSQL access and migrations ([`db`]), and metrics.

pub mod amqp;
pub mod config;
pub mod db;
pub mod envelope;
pub mod event;
pub mod form;
pub mod metrics;
pub mod portals;
pub mod secret;
pub mod signal;
pub mod telemetry;

pub use envelope::{Envelope, EnvelopeKind};
pub use secret::Secret;
pub use signal::shutdown_signal;
