//! Starts the real ingress in-process, on port 0, under a fresh `AMQP_PREFIX`, so
//! every test has its own exchange and queues and tests run in parallel.

use crate::http::HttpClient;
use b24_ingress::App;
use b24_shared::amqp::Topology;
use b24_shared::config::IngressConfig;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub fn unique_prefix(tag: &str) -> String {
    format!("t-{tag}-{}", uuid::Uuid::now_v7().simple())
}

/// Sends a real SIGTERM to a binary a test started, as an orchestrator stopping it does.
pub fn sigterm(child: &std::process::Child) {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "SIGTERM sent to pid {}", child.id());
}

pub struct TestIngress {
    pub addr: SocketAddr,
    pub prefix: String,
    pub topology: Topology,
    pub http: HttpClient,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The prefix's queues were deleted (by `finish`).
    cleaned: bool,
}

/// A test that panics before `finish` must not leave its queues on the broker.
impl Drop for TestIngress {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let prefix = self.prefix.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(crate::broker::delete_topology(&prefix));
            }
        })
        .join();
    }
}

impl TestIngress {
    /// Starts an ingress with default settings but for `overrides` (env names), and
    /// waits until it is connected to the broker.
    pub async fn spawn(tag: &str, overrides: &[(&str, &str)]) -> Self {
        let ingress = Self::start(tag, overrides).await;
        ingress.wait_ready(Duration::from_secs(15)).await;
        ingress
    }

    /// Starts an ingress without waiting for the broker. Its `PUBLIC_URL` is its own
    /// address (`http://127.0.0.1:PORT`) unless overridden: the port is bound first so
    /// the install page it serves binds events to this very ingress.
    pub async fn start(tag: &str, overrides: &[(&str, &str)]) -> Self {
        let prefix = unique_prefix(tag);
        let mut env: HashMap<String, String> = HashMap::from([
            ("AMQP_PREFIX".into(), prefix.clone()),
            ("INGRESS_ADDR".into(), "127.0.0.1:0".into()),
            ("AMQP_URL".into(), crate::broker::amqp_url()),
            // No portals table unless a test gives one: the default database name is
            // shared by everything on this server, and whether it happens to exist must
            // not decide whether a test's events are checked.
            ("DATABASE_URL".into(), "off".into()),
        ]);
        env.extend(
            overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let listener = tokio::net::TcpListener::bind(env["INGRESS_ADDR"].as_str())
            .await
            .expect("ingress address binds");
        let addr = listener.local_addr().expect("bound address");
        env.entry("PUBLIC_URL".into())
            .or_insert_with(|| format!("http://{addr}"));
        let config = IngressConfig::from_lookup(&|k| env.get(k).cloned()).expect("test config");
        let app = App::build_on(config, listener)
            .await
            .expect("ingress starts");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            topology: Topology::new(prefix.clone()),
            prefix,
            http: HttpClient::new(addr),
            stop: Some(stop),
            task: Some(task),
            cleaned: false,
        }
    }

    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(a) = self.http.get("/readyz").await {
                if a.status.is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "ingress not ready within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Triggers the same shutdown SIGTERM triggers and waits until the app returns.
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    pub fn stop_handle(&mut self) -> Option<oneshot::Sender<()>> {
        self.stop.take()
    }

    pub async fn join(&mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// POSTs `payload` form-encoded, as Bitrix24 (PHP) does.
    pub async fn post_form(&self, path: &str, payload: &serde_json::Value) -> crate::http::Answer {
        self.http
            .post(
                path,
                Some(crate::http::FORM),
                crate::phpform::http_build_query(payload),
            )
            .await
            .expect("ingress answers")
    }

    pub async fn work_messages(&self) -> Vec<b24_shared::Envelope> {
        crate::broker::drain(&self.topology.work_queue())
            .await
            .expect("drain work queue")
    }

    pub async fn metrics(&self) -> String {
        self.http.get("/metrics").await.expect("metrics").body
    }

    /// Stops the app and removes its queues.
    pub async fn finish(mut self) {
        self.shutdown().await;
        let _ = crate::broker::delete_topology(&self.prefix).await;
        self.cleaned = true;
    }
}

/// Polls `check` until it returns `Some` or the deadline passes.
pub async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
