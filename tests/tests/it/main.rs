//! Integration tests: the real ingress, in-process, against the real RabbitMQ; each
//! test under its own AMQP_PREFIX.

mod ingress_broker_outage;
mod ingress_rejects;
mod ingress_seeds;
mod ingress_shutdown;
