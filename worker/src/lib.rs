//! The worker: consumes the work queue, verifies each message against the stored
//! portal, fetches what it points at from Bitrix24, stores it in PostgreSQL, and only
//! then acks. Handlers live in [`handlers`], one module per event family.

mod app;
pub mod batch;
pub mod bitrix;
pub mod config;
pub mod consumer;
pub mod crypto;
pub mod dlq;
pub mod handlers;
mod http;
pub mod metrics;
pub mod reconcile;
pub mod store;
pub mod verify;

pub use app::App;
pub use config::WorkerConfig;
