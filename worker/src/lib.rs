//! The worker: consumes the work queue, verifies each message against the stored
//! portal, fetches what it points at from Bitrix24, stores it in PostgreSQL, and only
//! then acks. Handlers live in [`handlers`], one module per event family.

mod app;
pub mod batch;
pub mod consumer;
pub mod dlq;
pub mod handlers;
mod http;
pub mod metrics;
pub mod store;

pub use app::App;

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
