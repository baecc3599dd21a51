//! Integration tests: the real ingress and worker, in-process, against the real
//! RabbitMQ and PostgreSQL and a simulated Bitrix24 portal; each test under its own
//! AMQP_PREFIX and database.

mod client_limits;
mod demo;
mod harness;
mod ingress_broker_outage;
mod ingress_hostage;
mod ingress_payloads;
mod ingress_portals;
mod ingress_rejects;
mod ingress_seeds;
mod ingress_shutdown;
mod k8s_manifests;
mod metrics_coverage;
mod sim_pipeline;
mod trust;
mod worker_failures;
mod worker_seeds;
