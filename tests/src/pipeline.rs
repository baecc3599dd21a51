//! The whole pipeline in one test: the real ingress and worker apps in-process, a
//! fresh PostgreSQL database, a fresh AMQP_PREFIX, and a simulated portal.

use crate::portal::{InstallReport, PortalConfig, SimPortal};
use crate::spawn::{eventually, TestIngress};
use b24_worker::WorkerConfig;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_postgres::NoTls;

pub const SEED_MEMBER: &str = "a223c6b3710f85df22e9377d6c4f7553";
pub const SEED_DOMAIN: &str = "some-domain.bitrix24.com";
pub const SEED_APP_TOKEN: &str = "51856fefc120afa4b628cc82d3935cce";

/// The key test workers seal tokens with (`B24_TOKEN_KEY`); [`Pipeline::stored_tokens`]
/// opens them.
pub const TEST_TOKEN_KEY: &str = "dGVzdC1rZXktdGVzdC1rZXktdGVzdC1rZXktdGVzdC0=";

pub fn pg_base() -> String {
    std::env::var("TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A database of its own for one test, dropped at the end: by [`TestDb::drop_db`],
/// or when the value goes away (a failed test panics past its clean-up, and must not
/// leave its database behind).
pub struct TestDb {
    pub name: String,
    pub url: String,
    dropped: std::sync::atomic::AtomicBool,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.dropped.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let name = self.name.clone();
        // Drop runs outside any runtime's reach (maybe during a panic): a thread of its
        // own with a runtime of its own.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(drop_database(&name));
            }
        })
        .join();
    }
}

async fn drop_database(name: &str) {
    if let Ok((client, conn)) =
        tokio_postgres::connect(&format!("{}/postgres", pg_base()), NoTls).await
    {
        tokio::spawn(conn);
        let _ = client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                name.replace('"', "")
            ))
            .await;
    }
}

impl TestDb {
    /// Only names the database: the worker creates it (as it does in production).
    pub fn new(tag: &str) -> Self {
        let name = format!("t_{tag}_{}", uuid::Uuid::now_v7().simple());
        Self {
            url: format!("{}/{name}", pg_base()),
            name,
            dropped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .expect("test database reachable");
        tokio::spawn(conn);
        client
    }

    pub async fn drop_db(&self) {
        if !self.dropped.swap(true, std::sync::atomic::Ordering::SeqCst) {
            drop_database(&self.name).await;
        }
    }
}

/// A worker app on a runtime of its own, so that killing it really stops every task
/// it had, mid-call, like a crashed process.
pub struct TestWorker {
    pub metrics_addr: SocketAddr,
    control: Option<std::sync::mpsc::Sender<Stop>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Stop {
    Graceful,
    Kill,
}

/// A worker still running when its test ends (a failed test) is killed, so it cannot
/// outlive the queues and database it was given.
impl Drop for TestWorker {
    fn drop(&mut self) {
        if let Some(c) = self.control.take() {
            let _ = c.send(Stop::Kill);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl TestWorker {
    fn spawn(config: WorkerConfig) -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (control, control_rx) = std::sync::mpsc::channel::<Stop>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("worker runtime");
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let app = match rt.block_on(b24_worker::App::build(config)) {
                Ok(app) => app,
                Err(e) => {
                    let _ = addr_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = addr_tx.send(Ok(app.metrics_addr()));
            let run = rt.spawn(app.run_until_stopped(async {
                let _ = stop_rx.await;
            }));
            match control_rx.recv() {
                Ok(Stop::Graceful) | Err(_) => {
                    let _ = stop_tx.send(());
                    let _ = rt.block_on(run);
                }
                // Dropping the runtime cancels every task at its next await: calls in
                // flight never finish, sockets close, the broker requeues.
                Ok(Stop::Kill) => rt.shutdown_background(),
            }
        });
        let metrics_addr = addr_rx
            .recv()
            .expect("worker thread reports")
            .expect("worker builds");
        Self {
            metrics_addr,
            control: Some(control),
            thread: Some(thread),
        }
    }

    pub async fn stop(&mut self) {
        self.end(Stop::Graceful).await;
    }

    /// A crash: the worker stops dead, mid-message.
    pub async fn kill(&mut self) {
        self.end(Stop::Kill).await;
    }

    async fn end(&mut self, how: Stop) {
        if let Some(c) = self.control.take() {
            let _ = c.send(how);
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Fields drop in this order when a test fails before `finish`: workers first (a
/// running worker would declare the queues again), then the ingress and its queues,
/// then the database.
pub struct Pipeline {
    pub workers: Vec<TestWorker>,
    pub ingress: TestIngress,
    pub db: TestDb,
    pub portal: SimPortal,
    worker_env: HashMap<String, String>,
}

impl Pipeline {
    /// Starts the ingress, a portal whose member_id is the seeds' (its domain is its own
    /// address, the host of its `client_endpoint`, as on Bitrix24), and `workers` worker
    /// instances.
    pub async fn start(tag: &str, workers: usize, overrides: &[(&str, &str)]) -> Self {
        Self::start_with(
            tag,
            workers,
            PortalConfig {
                member_id: SEED_MEMBER.into(),
                ..PortalConfig::default()
            },
            overrides,
        )
        .await
    }

    pub async fn start_with(
        tag: &str,
        workers: usize,
        portal: PortalConfig,
        overrides: &[(&str, &str)],
    ) -> Self {
        let db = TestDb::new(tag);
        let ingress = TestIngress::spawn(tag, &[("DATABASE_URL", &db.url)]).await;
        let portal = SimPortal::start(portal).await;
        let mut env: HashMap<String, String> = HashMap::from([
            ("AMQP_PREFIX".into(), ingress.prefix.clone()),
            ("AMQP_URL".into(), crate::broker::amqp_url()),
            ("DATABASE_URL".into(), db.url.clone()),
            ("WORKER_METRICS_ADDR".into(), "127.0.0.1:0".into()),
            ("PUBLIC_URL".into(), format!("http://{}", ingress.addr)),
            ("B24_CLIENT_ID".into(), portal.client_id()),
            ("B24_CLIENT_SECRET".into(), portal.client_secret()),
            ("B24_OAUTH_URL".into(), portal.oauth_url()),
            ("B24_ALLOWED_HOSTS".into(), "http://127.0.0.1:*".into()),
            ("WORKER_SHUTDOWN_GRACE_MS".into(), "5000".into()),
            ("B24_TOKEN_KEY".into(), TEST_TOKEN_KEY.into()),
            // Offline events are collected only by the tests about them, so the others
            // see exactly the calls their events cause.
            ("WORKER_RECONCILE_INTERVAL_S".into(), "0".into()),
            // Tests run side by side against one server with max_connections 100.
            ("WORKER_DB_POOL".into(), "3".into()),
        ]);
        env.extend(
            overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let mut p = Self {
            ingress,
            db,
            portal,
            workers: Vec::new(),
            worker_env: env,
        };
        for _ in 0..workers {
            p.add_worker().await;
        }
        p
    }

    /// The environment an in-process worker gets; a `worker` binary started with it
    /// joins the same pipeline.
    pub fn worker_env(&self) -> &HashMap<String, String> {
        &self.worker_env
    }

    /// Changes the environment of workers added from now on.
    pub fn set_worker_env(&mut self, name: &str, value: &str) {
        self.worker_env.insert(name.to_string(), value.to_string());
    }

    pub async fn add_worker(&mut self) {
        let env = self.worker_env.clone();
        let config = WorkerConfig::from_lookup(&|k| env.get(k).cloned()).expect("worker config");
        let worker = tokio::task::spawn_blocking(move || TestWorker::spawn(config))
            .await
            .expect("worker thread starts");
        self.workers.push(worker);
    }

    /// Posts an event to the ingress, form-encoded as Bitrix24 does; asserts the 200.
    pub async fn post(&self, path: &str, payload: &Value) {
        let a = self.ingress.post_form(path, payload).await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
    }

    /// The ONAPPINSTALL event Bitrix24 would send for this portal.
    pub fn install_event(&self, member_id: &str, domain: &str) -> Value {
        let (access, refresh) = self.portal.issue_tokens();
        json!({
            "event": "ONAPPINSTALL",
            "data": {"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"},
            "ts": "1741092400",
            "auth": {
                "access_token": access,
                "expires_in": "3600",
                "scope": "crm",
                "domain": domain,
                "server_endpoint": self.portal.server_endpoint(),
                "status": "L",
                "client_endpoint": self.portal.client_endpoint(),
                "member_id": member_id,
                "refresh_token": refresh,
                "application_token": SEED_APP_TOKEN,
            }
        })
    }

    /// Installs the portal through the pipeline itself and waits until it is stored. The
    /// simulated portal counts our application as installed with the seeds'
    /// `application_token` from then on, so what it emits carries the stored token.
    pub async fn install(&self, member_id: &str, domain: &str) {
        self.portal.mark_installed(SEED_APP_TOKEN);
        self.post("/events", &self.install_event(member_id, domain))
            .await;
        let db = self.db_client().await;
        let ok = eventually(Duration::from_secs(30), || async {
            let row = db
                .query_opt(
                    "SELECT 1 FROM portals p JOIN events e ON e.member_id = p.member_id
                      WHERE p.member_id = $1 AND p.status = 'installed'
                        AND e.event = 'ONAPPINSTALL' AND e.status = 'done'",
                    &[&member_id],
                )
                .await
                .ok()??;
            Some(row)
        })
        .await;
        assert!(ok.is_some(), "portal {member_id} installed within 30 s");
    }

    /// Publishes an event straight to the broker, as an ingress that could not
    /// check it (database down) would have: the worker must verify it itself.
    pub async fn publish_unchecked(&self, payload: &Value) {
        let event = b24_shared::event::InboundEvent::parse(payload).expect("a valid event");
        let env = b24_shared::Envelope::new(
            b24_shared::EnvelopeKind::Event,
            event.event.as_str().to_string(),
            event.auth.member_id.clone(),
            event.auth.domain.clone(),
            payload.clone(),
        );
        let conn = crate::broker::connect().await.expect("broker");
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(Default::default())
            .await
            .expect("confirms");
        let confirm = ch
            .basic_publish(
                self.ingress.topology.exchange().as_str().into(),
                env.routing_key().as_str().into(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &env.to_json(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
        let _ = conn.close(200, "done".into()).await;
    }

    pub async fn install_seed_portal(&self) {
        self.install(SEED_MEMBER, &self.portal.domain()).await;
    }

    /// The portal's stored (access, refresh) pair, opened with the test key; `None`s
    /// when erased.
    pub async fn stored_tokens(&self, member_id: &str) -> (Option<String>, Option<String>) {
        let cipher =
            b24_worker::crypto::TokenCipher::new(&b24_shared::Secret::new(TEST_TOKEN_KEY), None)
                .expect("test key");
        let member = b24_shared::event::MemberId::parse(member_id).expect("member_id");
        let row = self
            .db_client()
            .await
            .query_one(
                "SELECT access_token, refresh_token FROM portals WHERE member_id = $1",
                &[&member_id],
            )
            .await
            .expect("the portal has a row");
        let open = |v: Option<String>| {
            v.map(|v| {
                cipher
                    .open(&member, &b24_shared::portals::Sealed(v))
                    .expect("sealed with the test key")
                    .secret()
                    .expose()
                    .to_string()
            })
        };
        (open(row.get(0)), open(row.get(1)))
    }

    /// Installs as Bitrix24 does: the simulated portal opens the ingress's
    /// `/install` as an administrator's browser would, registers what the page binds,
    /// and sends `ONAPPINSTALL` after `installFinish` (see
    /// [`SimPortal::install_app`]). Waits until the `portals` row is `installed` with the
    /// portal's `application_token` and the worker has finished `ONAPPINSTALL` (its
    /// `events` row is `done`: the worker binds its handlers while handling it).
    /// Returns what the portal did; panics if the page did not finish the installation
    /// or the pipeline did not store it within 30 s.
    pub async fn install_via_portal(&self) -> InstallReport {
        let url = format!("http://{}/install", self.ingress.addr);
        let report = self.portal.install_app(&url).await;
        assert!(
            report.finished,
            "the install page finished the installation: {report:?}"
        );
        self.wait_installed(Duration::from_secs(30)).await;
        report
    }

    /// Waits until the portal's row is `installed` with its current
    /// `application_token` and an `ONAPPINSTALL` is `done`; panics after `within`.
    pub async fn wait_installed(&self, within: Duration) {
        let member_id = self.portal.member_id();
        let token = b24_shared::portals::token_digest(&self.portal.application_token());
        let db = self.db_client().await;
        let ok = eventually(within, || async {
            db.query_opt(
                "SELECT 1 FROM portals p
                  WHERE p.member_id = $1 AND p.status = 'installed'
                    AND p.application_token_sha256 = $2
                    AND EXISTS (SELECT 1 FROM events e WHERE e.member_id = p.member_id
                                   AND e.event = 'ONAPPINSTALL' AND e.status = 'done')",
                &[&member_id, &token],
            )
            .await
            .ok()?
        })
        .await;
        assert!(
            ok.is_some(),
            "portal {member_id} installed with its application_token within {within:?}"
        );
    }

    /// A seed payload as this simulated portal would send it: an event's `auth`
    /// (`domain`, `client_endpoint`, `server_endpoint`, `member_id`,
    /// `application_token`, and `access_token`/`refresh_token` as a fresh pair of the
    /// administrator) and a widget call's `DOMAIN`, `PROTOCOL` (`0`: the simulator
    /// speaks http), `member_id`, `SERVER_ENDPOINT`, `APPLICATION_TOKEN` and
    /// `AUTH_ID`/`REFRESH_ID` (a fresh pair of the administrator) become the portal's.
    /// Only keys the seed has are rewritten, so each keeps its documented shape
    /// (`ONAPPPAYMENT` stays without tokens).
    pub fn seed(&self, payload: &Value) -> Value {
        seed_for(&self.portal, payload)
    }

    /// The sum over this pipeline's workers of a counter, named with its labels as
    /// Prometheus prints them: `b24_worker_messages_total{event="X",outcome="done"}`.
    pub async fn worker_counter(&self, series: &str) -> u64 {
        let mut total = 0;
        for w in &self.workers {
            let http = crate::http::HttpClient::new(w.metrics_addr);
            let Ok(a) = http.get("/metrics").await else {
                continue;
            };
            total += a
                .body
                .lines()
                .filter_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
                .sum::<f64>() as u64;
        }
        total
    }

    /// Waits until the workers counted `n` messages of `event` dropped for failing
    /// verification with `reason`.
    pub async fn wait_verification_failures(&self, event: &str, reason: &str, n: u64) -> bool {
        let series = format!(
            "b24_worker_verification_failures_total{{event=\"{event}\",reason=\"{reason}\"}}"
        );
        eventually(Duration::from_secs(30), || async {
            (self.worker_counter(&series).await >= n).then_some(())
        })
        .await
        .is_some()
    }

    /// The broker settings this pipeline's apps use (for the `dlq` commands).
    pub fn amqp_config(&self) -> b24_shared::config::AmqpConfig {
        let prefix = self.ingress.prefix.clone();
        let url = crate::broker::amqp_url();
        b24_shared::config::AmqpConfig::from_lookup(&move |k| match k {
            "AMQP_PREFIX" => Some(prefix.clone()),
            "AMQP_URL" => Some(url.clone()),
            _ => None,
        })
        .expect("test AMQP settings")
    }

    /// The dead letters, as `worker dlq list` shows them (nothing is taken).
    pub async fn dead_letters(&self) -> Vec<Value> {
        b24_worker::dlq::peek(&self.amqp_config(), 100)
            .await
            .expect("dead-letter queue readable")
    }

    /// A message of `event` failed verification for `reason`: counted, and neither
    /// stored in `events` nor dead-lettered.
    pub async fn expect_dropped(&self, event: &str, reason: &str) {
        assert!(
            self.wait_verification_failures(event, reason, 1).await,
            "{event} dropped for {reason}:\n{}",
            self.events_summary().await
        );
        assert_eq!(
            self.event_count_and_attempts(event).await.0,
            0,
            "{event} not stored"
        );
        assert!(
            self.dead_letters().await.is_empty(),
            "nothing dead-lettered"
        );
    }

    /// A client of the test database, once the worker has created it.
    pub async fn db_client(&self) -> tokio_postgres::Client {
        let ready = eventually(Duration::from_secs(20), || async {
            tokio_postgres::connect(&self.db.url, NoTls).await.ok()
        })
        .await;
        let (client, conn) = ready.expect("test database exists");
        tokio::spawn(conn);
        client
    }

    /// Waits until `n` events with this code reached `status`; fails the test with what
    /// the events table holds (status, error code, count) if they do not in time.
    pub async fn expect_events(&self, event: &str, status: &str, n: i64, within: Duration) {
        if self.wait_events(event, status, n, within).await {
            return;
        }
        panic!(
            "expected {n} {event} events `{status}` within {within:?}; the events table holds:\n{}",
            self.events_summary().await
        );
    }

    /// `event status error_code count` lines of the events table, for failure messages.
    pub async fn events_summary(&self) -> String {
        let db = self.db_client().await;
        let rows = db
            .query(
                "SELECT event, status, coalesce(error_code, ''), count(*), max(attempts)
                   FROM events GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                &[],
            )
            .await
            .unwrap_or_default();
        rows.iter()
            .map(|r| {
                format!(
                    "  {} {} {} x{} (max attempts {})",
                    r.get::<_, String>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, i64>(3),
                    r.get::<_, i32>(4)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until `n` events with this code reached `status`.
    pub async fn wait_events(&self, event: &str, status: &str, n: i64, within: Duration) -> bool {
        let db = self.db_client().await;
        eventually(within, || async {
            let row = db
                .query_one(
                    "SELECT count(*) FROM events WHERE event = $1 AND status = $2",
                    &[&event, &status],
                )
                .await
                .ok()?;
            (row.get::<_, i64>(0) >= n).then_some(())
        })
        .await
        .is_some()
    }

    /// The newest row of `event`: (status, error_code, last_error).
    pub async fn last_event(&self, event: &str) -> (String, Option<String>, Option<String>) {
        let row = self
            .db_client()
            .await
            .query_one(
                "SELECT status, error_code, last_error FROM events WHERE event = $1
                  ORDER BY id DESC LIMIT 1",
                &[&event],
            )
            .await
            .expect("the event has a row");
        (row.get(0), row.get(1), row.get(2))
    }

    /// Number of rows of `event`, and the newest one's attempts.
    pub async fn event_count_and_attempts(&self, event: &str) -> (i64, i32) {
        let row = self
            .db_client()
            .await
            .query_one(
                "SELECT count(*), coalesce(max(attempts), 0) FROM events WHERE event = $1",
                &[&event],
            )
            .await
            .expect("events table");
        (row.get(0), row.get(1))
    }

    pub async fn entity(&self, member_id: &str, kind: &str, id: &str) -> Option<Value> {
        let db = self.db_client().await;
        db.query_opt(
            "SELECT data FROM entities WHERE member_id = $1 AND kind = $2 AND entity_id = $3",
            &[&member_id, &kind, &id],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0))
    }

    /// REST calls the portal saw for `method` (lower case), batch commands included.
    pub fn calls_of(&self, method: &str) -> Vec<crate::portal::Call> {
        self.portal
            .calls()
            .into_iter()
            .filter(|c| c.method == method)
            .collect()
    }

    pub async fn finish(mut self) {
        for w in &mut self.workers {
            w.stop().await;
        }
        let prefix = self.ingress.prefix.clone();
        self.ingress.finish().await;
        let _ = crate::broker::delete_topology(&prefix).await;
        self.db.drop_db().await;
    }
}

/// A seed payload rewritten to `portal`'s identity (domain, endpoints, member_id,
/// application_token, fresh tokens), as [`Pipeline::seed`] does: for drivers that run
/// a simulated portal without a `Pipeline`.
pub fn seed_for(portal: &SimPortal, payload: &Value) -> Value {
    let mut p = payload.clone();
    let set = |o: &mut serde_json::Map<String, Value>, key: &str, value: String| {
        if o.contains_key(key) {
            o.insert(key.to_owned(), Value::String(value));
        }
    };
    if let Some(auth) = p.get_mut("auth").and_then(Value::as_object_mut) {
        set(auth, "domain", portal.domain());
        set(auth, "client_endpoint", portal.client_endpoint());
        set(auth, "server_endpoint", portal.server_endpoint());
        set(auth, "member_id", portal.member_id());
        set(auth, "application_token", portal.application_token());
        if auth.contains_key("access_token") || auth.contains_key("refresh_token") {
            let (access, refresh) = portal.issue_tokens();
            set(auth, "access_token", access);
            set(auth, "refresh_token", refresh);
        }
    }
    if let Some(o) = p.as_object_mut().filter(|o| o.contains_key("AUTH_ID")) {
        let (access, refresh) = portal.issue_tokens();
        set(o, "DOMAIN", portal.domain());
        set(o, "PROTOCOL", "0".into());
        set(o, "member_id", portal.member_id());
        set(o, "SERVER_ENDPOINT", portal.server_endpoint());
        set(o, "APPLICATION_TOKEN", portal.application_token());
        set(o, "AUTH_ID", access);
        set(o, "REFRESH_ID", refresh);
    }
    p
}
