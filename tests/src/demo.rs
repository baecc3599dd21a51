//! The one-command demo: the real ingress and worker, the simulated portal standing in
//! for a Bitrix24 account, and the documentation's seed events sent through it all.
//! `cargo run -p b24-tests --bin demo` prints what landed where.

use crate::fixtures;
use crate::pipeline::Pipeline;
use serde_json::Value;
use std::fmt::Write;
use std::time::Duration;

/// What the demo shows a user.
pub struct Report {
    pub ingress_url: String,
    pub worker_metrics_url: String,
    pub database_url: String,
    /// (event, status) for every event row.
    pub events: Vec<(String, String)>,
    /// (kind, entity_id, a short summary) for every entity row.
    pub entities: Vec<(String, String, String)>,
    /// (member_id, domain, status, app_status).
    pub portals: Vec<(String, String, String, Option<String>)>,
}

/// Runs the pipeline with the seeds and returns it (still running) with the report.
pub async fn run() -> (Pipeline, Report) {
    let p = Pipeline::start("demo", 1, &[]).await;
    p.install_seed_portal().await;
    p.portal
        .set_app_info(serde_json::json!({"STATUS": "P", "PAYMENT_EXPIRED": "N", "DAYS": 28}));
    // The seeds as this portal sends them: its domain, its application_token, and
    // widgets opened by its administrator with their own tokens (the documentation's
    // tokens prove nothing to any portal).
    let mut sent = vec![
        ("/events", p.seed(&fixtures::deal_recurring_expose())),
        ("/events", p.seed(&fixtures::requisite_add())),
        ("/events", p.seed(&fixtures::app_payment())),
    ];
    for call in fixtures::placements() {
        sent.push(("/placement", p.seed(&call)));
    }
    for (path, payload) in &sent {
        p.post(path, payload).await;
    }
    let db = p.db_client().await;
    // ONAPPINSTALL plus everything sent: wait until none is still in progress.
    let expected = sent.len() as i64 + 1;
    crate::spawn::eventually(Duration::from_secs(60), || async {
        let row = db
            .query_one(
                "SELECT count(*) FILTER (WHERE status IN ('done', 'dead', 'ignored')) FROM events",
                &[],
            )
            .await
            .ok()?;
        (row.get::<_, i64>(0) >= expected).then_some(())
    })
    .await;

    let events = db
        .query("SELECT event, status FROM events ORDER BY id", &[])
        .await
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        .unwrap_or_default();
    let entities = db
        .query(
            "SELECT kind, entity_id, data FROM entities ORDER BY kind, entity_id",
            &[],
        )
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| (r.get(0), r.get(1), summary(&r.get::<_, Value>(2))))
                .collect()
        })
        .unwrap_or_default();
    let portals = db
        .query(
            "SELECT member_id, domain, status, app_status FROM portals",
            &[],
        )
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect()
        })
        .unwrap_or_default();
    let report = Report {
        ingress_url: format!("http://{}", p.ingress.addr),
        worker_metrics_url: format!("http://{}/metrics", p.workers[0].metrics_addr),
        database_url: p.db.url.clone(),
        events,
        entities,
        portals,
    };
    (p, report)
}

/// A few telling fields of an entity, so a line stays short.
fn summary(data: &Value) -> String {
    let keys = [
        "TITLE",
        "title",
        "NAME",
        "CODE",
        "STATUS",
        "ACTIVE",
        "OPPORTUNITY",
        "DEAL_ID",
    ];
    let mut out = Vec::new();
    if let Value::Object(o) = data {
        for k in keys {
            if let Some(v) = o.get(k).filter(|v| !v.is_null()) {
                out.push(format!(
                    "{k}={}",
                    v.as_str().map(str::to_string).unwrap_or(v.to_string())
                ));
            }
        }
        out.push(format!("({} fields)", o.len()));
    }
    out.join(" ")
}

impl Report {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "ingress:        {} (POST /events, /placement, /install)",
            self.ingress_url
        );
        let _ = writeln!(s, "ingress metrics: {}/metrics", self.ingress_url);
        let _ = writeln!(s, "worker metrics: {}", self.worker_metrics_url);
        let _ = writeln!(s, "database:       psql {}", self.database_url);
        let _ = writeln!(s, "\nportals:");
        for (m, d, st, app) in &self.portals {
            let _ = writeln!(
                s,
                "  {m}  {d}  {st}  app_status={}",
                app.as_deref().unwrap_or("-")
            );
        }
        let _ = writeln!(s, "\nevents (one row per distinct event):");
        for (e, st) in &self.events {
            let _ = writeln!(s, "  {e:<34} {st}");
        }
        let _ = writeln!(
            s,
            "\nentities (what the events pointed at, fetched from the portal):"
        );
        for (k, id, sum) in &self.entities {
            let _ = writeln!(s, "  {k:<16} {id:<8} {sum}");
        }
        s
    }
}
