//! The live observability drill behind `deploy/live-check.sh`: the real `ingress` and
//! two real `worker` processes, a simulated portal, a real Prometheus scraping them and
//! RabbitMQ, and the drills that must make the shipped alerts fire. Then every
//! dashboard panel query and every alert rule is evaluated through Prometheus's API.
//!
//! The script starts Prometheus (with the shipped rules, only their `for:` shortened)
//! and hands this drill its addresses through the environment; this drill starts and
//! stops the binaries itself, because stopping them is part of the drill.

use crate::broker;
use crate::fixtures;
use crate::http::{HttpClient, FORM};
use crate::phpform::http_build_query;
use crate::pipeline::{seed_for, TestDb, SEED_APP_TOKEN, SEED_MEMBER};
use crate::portal::{PortalConfig, SimPortal};
use crate::prometheus::{self, Prometheus};
use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

/// Alerts a drill below makes fire: each must have been active (pending or firing)
/// during the run. The others must at least see their input series.
pub const DRILLED: &[&str] = &[
    "DeadLetters",
    "IngressServerErrors",
    "IngressNotDurable",
    "WorkQueueNoConsumers",
    "NoWorkers",
    "WorkerDown",
    "WorkBacklogGrowing",
    "IngressDown",
    "RefreshFailures",
];

/// What the script hands over, from the environment.
pub struct LiveConfig {
    pub prometheus: SocketAddr,
    pub ingress_addr: SocketAddr,
    pub worker_addrs: Vec<SocketAddr>,
    pub ingress_bin: PathBuf,
    pub worker_bin: PathBuf,
    pub prefix: String,
    pub log_dir: PathBuf,
    pub dashboards: Vec<PathBuf>,
    pub scrape_secs: u64,
}

impl LiveConfig {
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |k: &str| std::env::var(k).with_context(|| format!("{k} is not set"));
        let addr = |k: &str| -> anyhow::Result<SocketAddr> {
            var(k)?
                .parse()
                .with_context(|| format!("{k} is not an address"))
        };
        let worker_addrs = var("LIVE_WORKER_ADDRS")?
            .split(',')
            .map(|a| a.trim().parse().context("LIVE_WORKER_ADDRS"))
            .collect::<anyhow::Result<Vec<SocketAddr>>>()?;
        let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        let mut dashboards = Vec::new();
        for entry in std::fs::read_dir(root.join("deploy/grafana/dashboards"))? {
            dashboards.push(entry?.path());
        }
        dashboards.sort();
        Ok(Self {
            prometheus: addr("LIVE_PROMETHEUS_ADDR")?,
            ingress_addr: addr("LIVE_INGRESS_ADDR")?,
            worker_addrs,
            ingress_bin: var("LIVE_INGRESS_BIN")?.into(),
            worker_bin: var("LIVE_WORKER_BIN")?.into(),
            prefix: var("AMQP_PREFIX")?,
            log_dir: var("LIVE_LOG_DIR")?.into(),
            dashboards,
            scrape_secs: var("LIVE_SCRAPE_SECS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1),
        })
    }
}

/// A binary this drill started; killed if the drill ends without stopping it.
struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    fn spawn(
        name: &str,
        bin: &Path,
        env: &BTreeMap<String, String>,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("{name}.log")))?;
        let child = Command::new(bin)
            .envs(env)
            .env("LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
        })
    }

    /// SIGTERM, as an orchestrator stops it, and wait for the exit.
    async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        crate::spawn::sigterm(&child);
        let status = tokio::task::spawn_blocking(move || child.wait()).await??;
        ensure!(
            status.success(),
            "{} exited with {status} after SIGTERM",
            self.name
        );
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Live {
    cfg: LiveConfig,
    portal: SimPortal,
    db: TestDb,
    prom: Prometheus,
    http: HttpClient,
    ingress: Option<Proc>,
    workers: Vec<Proc>,
    started: f64,
    next_id: Arc<AtomicU64>,
}

fn say(line: impl AsRef<str>) {
    println!("live: {}", line.as_ref());
}

impl Live {
    pub async fn start(cfg: LiveConfig) -> anyhow::Result<Self> {
        let portal = SimPortal::start(PortalConfig {
            member_id: SEED_MEMBER.into(),
            ..PortalConfig::default()
        })
        .await;
        std::fs::create_dir_all(&cfg.log_dir)?;
        let mut live = Self {
            prom: Prometheus::new(cfg.prometheus),
            http: HttpClient::new(cfg.ingress_addr),
            db: TestDb::new("live"),
            portal,
            ingress: None,
            workers: Vec::new(),
            started: prometheus::now(),
            next_id: Arc::new(AtomicU64::new(1)),
            cfg,
        };
        live.start_ingress().await?;
        for i in 0..live.cfg.worker_addrs.len() {
            live.start_worker(i).await?;
        }
        Ok(live)
    }

    fn common_env(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("AMQP_URL".into(), broker::amqp_url()),
            ("AMQP_PREFIX".into(), self.cfg.prefix.clone()),
            ("DATABASE_URL".into(), self.db.url.clone()),
            ("RUST_LOG".into(), "info".into()),
        ])
    }

    async fn start_ingress(&mut self) -> anyhow::Result<()> {
        let mut env = self.common_env();
        env.insert("INGRESS_ADDR".into(), self.cfg.ingress_addr.to_string());
        env.insert("INGRESS_SHUTDOWN_GRACE_MS".into(), "2000".into());
        self.ingress = Some(Proc::spawn(
            "ingress",
            &self.cfg.ingress_bin,
            &env,
            &self.cfg.log_dir,
        )?);
        wait_ready(self.cfg.ingress_addr, "ingress").await
    }

    async fn start_worker(&mut self, i: usize) -> anyhow::Result<()> {
        let addr = self.cfg.worker_addrs[i];
        let mut env = self.common_env();
        env.extend([
            ("WORKER_METRICS_ADDR".into(), addr.to_string()),
            (
                "PUBLIC_URL".into(),
                format!("http://{}", self.cfg.ingress_addr),
            ),
            ("B24_CLIENT_ID".into(), self.portal.client_id()),
            ("B24_CLIENT_SECRET".into(), self.portal.client_secret()),
            ("B24_OAUTH_URL".into(), self.portal.oauth_url()),
            ("B24_ALLOWED_HOSTS".into(), "http://127.0.0.1:*".into()),
            ("WORKER_SHUTDOWN_GRACE_MS".into(), "3000".into()),
            ("WORKER_DB_POOL".into(), "3".into()),
            (
                "B24_TOKEN_KEY".into(),
                crate::pipeline::TEST_TOKEN_KEY.into(),
            ),
            // No offline-event polling: the drills count the calls their events cause.
            ("WORKER_RECONCILE_INTERVAL_S".into(), "0".into()),
            // Two tries in hand, then the delay queue: the query-limit drill shows
            // a retry through it too.
            ("B24_RETRY_ATTEMPTS".into(), "2".into()),
        ]);
        let name = format!("worker-{}", i + 1);
        let proc = Proc::spawn(&name, &self.cfg.worker_bin, &env, &self.cfg.log_dir)?;
        if i < self.workers.len() {
            self.workers[i] = proc;
        } else {
            self.workers.push(proc);
        }
        wait_ready(addr, &name).await
    }

    async fn db(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.db.url, NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    async fn post(&self, path: &str, payload: &Value) -> anyhow::Result<u16> {
        let a = self
            .http
            .post(path, Some(FORM), http_build_query(payload))
            .await?;
        Ok(a.status.as_u16())
    }

    async fn post_ok(&self, path: &str, payload: &Value) -> anyhow::Result<()> {
        let status = self.post(path, payload).await?;
        ensure!(status == 200, "POST {path} answered {status}");
        Ok(())
    }

    /// An event the pipeline accepts and records as `ignored`: no REST call, so a
    /// thousand of them cost the portal's budget nothing.
    fn ignored_event(&self) -> Value {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.seed(&ignored_event(n))
    }

    /// A seed rewritten to the simulated portal's identity.
    fn seed(&self, payload: &Value) -> Value {
        seed_for(&self.portal, payload)
    }

    /// Rows in the events table now.
    async fn rows(&self) -> anyhow::Result<i64> {
        let row = self
            .db()
            .await?
            .query_one("SELECT count(*) FROM events", &[])
            .await?;
        Ok(row.get(0))
    }

    /// Waits until there are at least `at_least` event rows, every one settled (done,
    /// dead or ignored), and nothing waits in the work queue; returns the count.
    async fn settled(&self, at_least: i64, within: Duration) -> anyhow::Result<i64> {
        let db = self.db().await?;
        let queue = format!("{}.work", self.cfg.prefix);
        let deadline = Instant::now() + within;
        loop {
            let row = db
                .query_one(
                    "SELECT count(*) FILTER (WHERE status IN ('done', 'dead', 'ignored')),
                            count(*) FROM events",
                    &[],
                )
                .await?;
            let (settled, all): (i64, i64) = (row.get(0), row.get(1));
            if settled >= at_least && settled == all && broker::ready_count(&queue).await? == 0 {
                return Ok(settled);
            }
            if Instant::now() > deadline {
                bail!("{settled} of {all} events settled within {within:?}, expected {at_least}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until Prometheus shows `alert` firing with these labels.
    async fn wait_alert(
        &self,
        alert: &str,
        labels: &[(&str, &str)],
        within: Duration,
    ) -> anyhow::Result<()> {
        let mut selector = format!("ALERTS{{alertname=\"{alert}\",alertstate=\"firing\"");
        for (k, v) in labels {
            selector.push_str(&format!(",{k}=\"{v}\""));
        }
        selector.push('}');
        let started = Instant::now();
        loop {
            if !self.prom.query(&selector).await?.is_empty() {
                say(format!(
                    "ok   alert {alert} firing after {:.0?} ({selector})",
                    started.elapsed()
                ));
                return Ok(());
            }
            if started.elapsed() > within {
                let active = self.prom.query("ALERTS").await?;
                let seen: Vec<String> = active
                    .iter()
                    .map(|s| format!("{}:{}", s.label("alertname"), s.label("alertstate")))
                    .collect();
                bail!("alert {alert} did not fire within {within:?}: {selector}; active: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn wait_targets_up(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let want = 2 + self.cfg.worker_addrs.len();
        loop {
            let targets = self.prom.targets().await?;
            let up = targets.iter().filter(|t| t.2 == "up").count();
            if up >= want {
                say(format!(
                    "ok   Prometheus scrapes {up} targets: {:?}",
                    targets
                        .iter()
                        .map(|t| format!("{}@{}", t.0, t.1))
                        .collect::<Vec<_>>()
                ));
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("Prometheus targets not all up: {targets:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Installs the seed portal through the pipeline and sends the documentation's
    /// seed events, as the demo does.
    async fn seeds(&self) -> anyhow::Result<()> {
        self.portal
            .set_app_info(json!({"STATUS": "P", "PAYMENT_EXPIRED": "N", "DAYS": 28}));
        self.portal.mark_installed(SEED_APP_TOKEN);
        let (access, refresh) = self.portal.issue_tokens();
        self.post_ok(
            "/events",
            &json!({
                "event": "ONAPPINSTALL",
                "data": {"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"},
                "ts": "1741092400",
                "auth": {
                    "access_token": access, "expires_in": "3600", "scope": "crm",
                    "domain": self.portal.domain(), "server_endpoint": self.portal.server_endpoint(),
                    "status": "L", "client_endpoint": self.portal.client_endpoint(),
                    "member_id": SEED_MEMBER, "refresh_token": refresh,
                    "application_token": SEED_APP_TOKEN,
                }
            }),
        )
        .await?;
        self.settled(1, Duration::from_secs(30)).await?;
        let mut sent = vec![
            ("/events", self.seed(&fixtures::deal_recurring_expose())),
            ("/events", self.seed(&fixtures::requisite_add())),
            ("/events", self.seed(&fixtures::app_payment())),
        ];
        for call in fixtures::placements() {
            sent.push(("/placement", self.seed(&call)));
        }
        for (path, payload) in &sent {
            self.post_ok(path, payload).await?;
        }
        let n = self
            .settled(1 + sent.len() as i64, Duration::from_secs(60))
            .await?;
        say(format!("ok   seeds: {n} events settled"));
        Ok(())
    }

    /// Three QUERY_LIMIT_EXCEEDED answers: backoff, a requeue through the delay
    /// queue (two tries per delivery here), then the event is stored.
    async fn query_limit(&self) -> anyhow::Result<()> {
        self.portal.fail_next(3, 503, "QUERY_LIMIT_EXCEEDED");
        let before = self.rows().await?;
        self.post_ok(
            "/events",
            &self.seed(&fixtures::requisite_add_numbered(501)),
        )
        .await?;
        let db = self.db().await?;
        self.settled(before + 1, Duration::from_secs(60)).await?;
        let row = db
            .query_one(
                "SELECT status, attempts FROM events
                  WHERE event = 'ONCRMREQUISITEADD' ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await?;
        let (status, attempts): (String, i32) = (row.get(0), row.get(1));
        ensure!(
            status == "done" && attempts == 2,
            "requisite after QUERY_LIMIT_EXCEEDED: {status} after {attempts} deliveries"
        );
        say("ok   3 × QUERY_LIMIT_EXCEEDED: backed off, requeued through the delay queue once, stored");
        Ok(())
    }

    /// A poison message, published straight to the broker past the ingress: not an
    /// envelope at all. The worker dead-letters it. (A forged application_token is no
    /// longer dead-lettered: verification failures are counted and dropped.)
    async fn poison_message(&self) -> anyhow::Result<()> {
        let topology = b24_shared::amqp::Topology::new(self.cfg.prefix.clone());
        let conn = broker::connect().await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(Default::default()).await?;
        let confirm = ch
            .basic_publish(
                topology.exchange().as_str().into(),
                "event.poison".into(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b"{not an envelope",
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        ensure!(confirm.is_ack(), "poison message not confirmed");
        let _ = conn.close(200, "done".into()).await;
        self.wait_alert(
            "DeadLetters",
            &[("code", "MALFORMED_ENVELOPE")],
            Duration::from_secs(60),
        )
        .await
    }

    /// The ingress's broker connection closed under traffic, again and again for as
    /// long as the 5xx alert needs to see it (its `for:` is short in the test rules):
    /// 503s, then recovery.
    async fn broker_closed(&self) -> anyhow::Result<()> {
        let needle = format!("b24-ingress/{}", self.cfg.prefix);
        let mut unavailable = 0;
        let mut closed = 0;
        let started = Instant::now();
        let fired = loop {
            let posts: Vec<_> = (0..8)
                .map(|_| {
                    let http = self.http.clone();
                    let body = http_build_query(&self.ignored_event());
                    tokio::spawn(async move { http.post("/events", Some(FORM), body).await })
                })
                .collect();
            closed += broker::close_connections(&needle)?;
            for p in posts {
                if let Ok(Ok(a)) = p.await {
                    unavailable += usize::from(a.status == 503);
                }
            }
            let firing = self
                .prom
                .query(r#"ALERTS{alertname="IngressServerErrors",alertstate="firing",route="events",status="503"}"#)
                .await?;
            if !firing.is_empty() || started.elapsed() > Duration::from_secs(60) {
                break !firing.is_empty();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        say(format!(
            "ok   broker connection closed {closed} times in {:.0?}: {unavailable} answers were 503",
            started.elapsed()
        ));
        ensure!(
            unavailable > 0,
            "closing the ingress's broker connection gave no 503"
        );
        ensure!(
            fired,
            "IngressServerErrors did not fire within 60 s of 503s"
        );
        wait_ready(self.cfg.ingress_addr, "ingress").await?;
        self.wait_alert(
            "IngressServerErrors",
            &[("route", "events"), ("status", "503")],
            Duration::from_secs(5),
        )
        .await?;
        self.wait_alert("IngressNotDurable", &[], Duration::from_secs(60))
            .await
    }

    /// Every worker stopped; the backlog grows past the alert's 1000.
    async fn workers_stopped(&mut self) -> anyhow::Result<()> {
        for w in &mut self.workers {
            w.stop().await?;
        }
        say("ok   workers stopped with SIGTERM");
        let before = self.rows().await?;
        let queue = format!("{}.work", self.cfg.prefix);
        let backlog = 1100;
        let mut tasks = Vec::new();
        let per_task = backlog / 10;
        for _ in 0..10 {
            let http = self.http.clone();
            let bodies: Vec<String> = (0..per_task)
                .map(|_| http_build_query(&self.ignored_event()))
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut ok = 0;
                for b in bodies {
                    if let Ok(a) = http.post("/events", Some(FORM), b).await {
                        ok += usize::from(a.status == 200);
                    }
                }
                ok
            }));
        }
        let mut accepted = 0;
        for t in tasks {
            accepted += t.await?;
        }
        ensure!(
            accepted == backlog,
            "{accepted} of {backlog} events accepted"
        );
        say(format!(
            "ok   {backlog} events queued with no worker running"
        ));
        self.wait_alert(
            "WorkQueueNoConsumers",
            &[("queue", &queue)],
            Duration::from_secs(60),
        )
        .await?;
        self.wait_alert("NoWorkers", &[], Duration::from_secs(60))
            .await?;
        self.wait_alert("WorkerDown", &[], Duration::from_secs(60))
            .await?;
        self.wait_alert(
            "WorkBacklogGrowing",
            &[("queue", &queue)],
            Duration::from_secs(60),
        )
        .await?;
        for i in 0..self.workers.len() {
            self.start_worker(i).await?;
        }
        let n = self
            .settled(before + backlog as i64, Duration::from_secs(120))
            .await?;
        say(format!(
            "ok   workers restarted; the backlog drained ({n} events settled)"
        ));
        Ok(())
    }

    /// The ingress stopped: Prometheus cannot scrape it.
    async fn ingress_down(&mut self) -> anyhow::Result<()> {
        if let Some(mut i) = self.ingress.take() {
            i.stop().await?;
        }
        self.wait_alert("IngressDown", &[], Duration::from_secs(60))
            .await?;
        self.start_ingress().await
    }

    /// The OAuth server answers `invalid_grant` to the refresh an expired token needs.
    async fn invalid_grant(&self) -> anyhow::Result<()> {
        self.portal.expire_access_tokens();
        self.portal.fail_next_oauth(1, 400, "invalid_grant");
        self.post_ok(
            "/events",
            &self.seed(&fixtures::requisite_add_numbered(502)),
        )
        .await?;
        self.wait_alert(
            "RefreshFailures",
            &[("outcome", "invalid_grant")],
            Duration::from_secs(60),
        )
        .await
    }

    pub async fn drills(&mut self) -> anyhow::Result<()> {
        self.wait_targets_up(Duration::from_secs(30)).await?;
        self.seeds().await?;
        self.query_limit().await?;
        self.poison_message().await?;
        self.broker_closed().await?;
        self.workers_stopped().await?;
        self.ingress_down().await?;
        self.invalid_grant().await?;
        // Two scrapes more, so the last counters are in.
        tokio::time::sleep(Duration::from_secs(2 * self.cfg.scrape_secs + 1)).await;
        Ok(())
    }

    /// Every alert rule and every panel query through Prometheus. Returns the failures.
    pub async fn evaluate(&self) -> anyhow::Result<Vec<String>> {
        let mut failures = Vec::new();
        let range = (prometheus::now() - self.started).ceil() as u64 + 5;
        let step = self.cfg.scrape_secs.max(1) as f64;

        let rules = self.prom.alert_rules().await?;
        ensure!(!rules.is_empty(), "Prometheus loaded no alert rules");
        for name in DRILLED {
            if !rules.iter().any(|r| r.1 == *name) {
                failures.push(format!("rule {name}: drilled here but not in the rules"));
            }
        }
        for (group, name, query) in &rules {
            let was_active = !self
                .prom
                .query(&format!(
                    "max_over_time(ALERTS{{alertname=\"{name}\"}}[{range}s])"
                ))
                .await?
                .is_empty();
            if was_active {
                say(format!(
                    "ok   rule {group}/{name}: went pending/firing in the drills"
                ));
                continue;
            }
            if DRILLED.contains(&name.as_str()) {
                failures.push(format!(
                    "rule {group}/{name}: never pending or firing though drilled"
                ));
                continue;
            }
            let input = prometheus::without_threshold(query);
            let found = self
                .prom
                .query_range(&input, self.started, step)
                .await
                .map(|s| s.iter().filter(|s| s.has_data()).count());
            match found {
                Ok(n) if n > 0 => say(format!(
                    "ok   rule {group}/{name}: not drilled; its input has {n} series: {input}"
                )),
                Ok(_) => failures.push(format!(
                    "rule {group}/{name}: no series for its input {input}"
                )),
                Err(e) => failures.push(format!("rule {group}/{name}: {e}")),
            }
        }

        for path in &self.cfg.dashboards {
            let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
            let queries = prometheus::dashboard_queries(&dashboard);
            ensure!(!queries.is_empty(), "{}: no panel queries", path.display());
            for q in queries {
                let what = format!("panel \"{}\" [{}]", q.panel, q.legend);
                let mut exprs = vec![q.expr.clone()];
                exprs.extend(prometheus::without_fallback(&q.expr));
                for expr in exprs {
                    let promql =
                        match prometheus::grafana_to_promql(&expr, range, self.cfg.scrape_secs) {
                            Ok(p) => p,
                            Err(e) => {
                                failures.push(format!("{what}: {e}"));
                                continue;
                            }
                        };
                    match self.prom.query_range(&promql, self.started, step).await {
                        Ok(s) if s.iter().any(|s| s.has_data()) => say(format!(
                            "ok   {what}: {} series",
                            s.iter().filter(|s| s.has_data()).count()
                        )),
                        Ok(_) => failures.push(format!("{what}: no series for {promql}")),
                        Err(e) => failures.push(format!("{what}: {e}")),
                    }
                }
            }
        }
        Ok(failures)
    }

    /// Stops the binaries and removes the queues and the database.
    pub async fn finish(mut self) {
        for w in &mut self.workers {
            if let Err(e) = w.stop().await {
                say(format!("note: {e}"));
            }
        }
        if let Some(mut i) = self.ingress.take() {
            if let Err(e) = i.stop().await {
                say(format!("note: {e}"));
            }
        }
        let _ = broker::delete_topology(&self.cfg.prefix).await;
        self.db.drop_db().await;
    }
}

/// An event code the pipeline does not handle, for this portal, with its real token.
pub fn ignored_event(n: u64) -> Value {
    json!({
        "event": "ONCRMDEALUPDATE",
        "data": {"FIELDS": {"ID": n.to_string()}},
        "ts": "1741092400",
        "auth": {
            "domain": "some-domain.bitrix24.com",
            "member_id": SEED_MEMBER,
            "application_token": SEED_APP_TOKEN,
            "client_endpoint": "https://some-domain.bitrix24.com/rest/",
            "server_endpoint": "https://oauth.bitrix.info/rest/",
        }
    })
}

async fn wait_ready(addr: SocketAddr, name: &str) -> anyhow::Result<()> {
    let http = HttpClient::new(addr);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(a) = http.get("/readyz").await {
            if a.status == 200 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{name} on {addr} not ready within 30 s (see its log)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The whole drill: start, drills, evaluation, cleanup. Fails naming every panel or
/// rule without data.
pub async fn run(cfg: LiveConfig) -> anyhow::Result<()> {
    let mut live = Live::start(cfg).await?;
    let outcome = match live.drills().await {
        Ok(()) => live.evaluate().await,
        Err(e) => Err(e),
    };
    live.finish().await;
    let failures = outcome?;
    if !failures.is_empty() {
        for f in &failures {
            println!("live: FAIL {f}");
        }
        bail!("{} panel queries or rules without data", failures.len());
    }
    Ok(())
}
