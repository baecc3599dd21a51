//! Test support for b24-pipeline: the seed payloads, a PHP-style form encoder, helpers
//! that start the real apps in-process against the real broker, and broker probes.
//! Everything here talks to the real RabbitMQ; nothing mocks it.

pub mod bench;
pub mod broker;
pub mod demo;
pub mod fixtures;
pub mod http;
pub mod live;
pub mod phpform;
pub mod pipeline;
pub mod portal;
pub mod prometheus;
pub mod spawn;
