//! Building and running the ingress. `App::build` binds the listener itself so tests
//! start the real app on port 0 and read the port back. Shutdown order matters: stop
//! accepting, drain requests in flight (each still gets its confirm), and only then
//! close the broker connection.

use crate::conn::{ClientSlots, RequestClock, Stamped, REFUSAL};
use crate::metrics::IngressMetrics;
use crate::routes::{self, State};
use b24_shared::amqp::Publisher;
use b24_shared::config::IngressConfig;
use b24_shared::form::FormLimits;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: Arc<State>,
    config: IngressConfig,
    publisher_stop: watch::Sender<bool>,
}

impl App {
    pub async fn build(config: IngressConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(config.addr).await?;
        Self::build_on(config, listener).await
    }

    /// Builds on a listener bound by the caller (`config.addr` is not used): a test
    /// that must know the address before the configuration is complete (its
    /// `PUBLIC_URL` is the ingress's own address) binds port 0 first.
    pub async fn build_on(config: IngressConfig, listener: TcpListener) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (publisher_stop, stop_rx) = watch::channel(false);
        let publisher = Publisher::start(
            config.amqp.clone(),
            config.confirm_timeout,
            &format!("b24-ingress/{}", config.amqp.prefix),
            stop_rx,
        );
        let metrics = IngressMetrics::default();
        let state = Arc::new(State {
            publisher,
            portals: crate::portals::PortalCache::new(
                config.database_url.as_ref(),
                config.install_grace,
                crate::portals::CAPACITY,
                metrics.portal_lookups.clone(),
            ),
            metrics,
            limits: FormLimits::default(),
            body_limit: config.body_limit,
            public_url: config.public_url.clone(),
            request_timeout: config.request_timeout,
        });
        Ok(Self {
            listener,
            local_addr,
            state,
            config,
            publisher_stop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics(&self) -> IngressMetrics {
        self.state.metrics.clone()
    }

    /// Serves until `shutdown` resolves, then drains within the configured grace.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) {
        let Self {
            listener,
            state,
            config,
            publisher_stop,
            ..
        } = self;
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let clients = ClientSlots::new(config.max_connections_per_client);
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .keep_alive(true);
        tokio::pin!(shutdown);

        loop {
            // Taking a slot before accepting bounds open connections; the rest wait in
            // the kernel's backlog instead of costing memory here.
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = &mut shutdown => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off briefly rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            // One address may not take every slot: the rest of the world's events
            // must still get in while it holds its share.
            let Some(client_slot) = clients.try_take(peer.ip()) else {
                state
                    .metrics
                    .rejections
                    .with_label_values(&["client_connections"])
                    .inc();
                tracing::debug!(%peer, "connection refused: its address holds its cap");
                // Best effort and never waiting: a client that does not read its
                // refusal costs nothing more than the close.
                let _ = stream.try_write(REFUSAL);
                drop(stream);
                drop(permit);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let gauge = state.metrics.open_connections.clone();
            let shared = state.clone();
            let clock = RequestClock::new();
            let io = TokioIo::new(Stamped::new(stream, clock.clone()));
            let service = service_fn(move |req| {
                let state = shared.clone();
                // Taken now, before the body is read: the request's first byte.
                let deadline = clock.started() + state.request_timeout;
                async move {
                    Ok::<_, std::convert::Infallible>(routes::handle(&state, req, deadline).await)
                }
            });
            let conn = graceful.watch(http.serve_connection(io, service));
            tokio::spawn(async move {
                gauge.inc();
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                gauge.dec();
                drop(client_slot);
                drop(permit);
            });
        }

        drop(listener);
        tracing::info!("shutting down: draining requests in flight");
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections drained"),
            () = tokio::time::sleep(config.shutdown_grace) => {
                tracing::warn!(grace = ?config.shutdown_grace, "grace period over; dropping connections");
            }
        }
        let _ = publisher_stop.send(true);
        state.publisher.close().await;
    }
}
