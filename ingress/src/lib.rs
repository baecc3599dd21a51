//! The HTTP edge: accepts Bitrix24 events, widget calls and install calls, and answers
//! 200 only once RabbitMQ confirmed the message. It never calls Bitrix24, so it stays
//! fast and up whatever the portals do.

mod app;
mod conn;
mod html;
mod metrics;
mod policy;
mod portals;
mod routes;

pub use app::App;
pub use metrics::IngressMetrics;
