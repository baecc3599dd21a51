//! The real `ingress` and `worker` binaries at `RUST_LOG=debug` and `trace`, taken
//! through an installation, events, widget and install-page calls, a token refresh and
//! a forged event: nothing they print contains a token or the client secret.
//! (tokio-postgres logs query parameters at debug; lapin, hyper and reqwest log frames,
//! headers or URLs at debug and trace: the default log filter pins them.)

use b24_tests::http::{HttpClient, FORM};
use b24_tests::phpform::http_build_query;
use b24_tests::pipeline::{Pipeline, SEED_APP_TOKEN, SEED_MEMBER};
use b24_tests::spawn::{self, eventually};
use b24_tests::{broker, fixtures};
use serde_json::{json, Value};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Cargo hands an integration test only its own crate's binaries; a workspace build
/// (what CI runs) puts the worker's beside the ingress's.
fn worker_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_ingress"))
        .with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: build the whole workspace first (cargo nextest run --workspace does)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A binary this test started, and the file its output goes to. Dropped (say, when an
/// assertion fails half-way) it kills the process and removes the file: a failing
/// test leaves nothing running.
struct Started {
    child: Option<Child>,
    log: PathBuf,
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Starts `binary` with `env`, its stdout and stderr both going to `log`.
fn start(binary: &Path, env: &[(String, String)], log: PathBuf) -> Started {
    let out = File::create(&log).unwrap();
    let child = Command::new(binary)
        // Whatever the developer's shell has set must not decide what is logged.
        .env_remove("LOG_FORMAT")
        .env_remove("RUST_LOG_DEPENDENCIES")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap_or_else(|e| panic!("{} starts: {e}", binary.display()));
    Started {
        child: Some(child),
        log,
    }
}

/// Stops the binary as an orchestrator would and returns what it printed.
async fn stop(mut started: Started) -> String {
    let mut child = started.child.take().expect("running");
    spawn::sigterm(&child);
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "clean exit: {exit:?}");
    std::fs::read_to_string(&started.log).unwrap()
}

/// The (access, refresh) pair in an event's `auth`.
fn pair_of(event: &Value) -> [String; 2] {
    ["access_token", "refresh_token"].map(|k| event["auth"][k].as_str().unwrap().to_string())
}

async fn no_token_in_output_at(level: &str) {
    let p = Pipeline::start(&format!("logs-{level}"), 0, &[]).await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let dir = std::env::temp_dir();
    let ingress_log = dir.join(format!("{}-ingress.log", p.ingress.prefix));
    let worker_log = dir.join(format!("{}-worker.log", p.ingress.prefix));
    let common = [
        ("RUST_LOG".to_string(), level.to_string()),
        ("AMQP_PREFIX".to_string(), p.ingress.prefix.clone()),
        ("AMQP_URL".to_string(), broker::amqp_url()),
        ("DATABASE_URL".to_string(), p.db.url.clone()),
    ];
    let mut ingress_env = common.to_vec();
    ingress_env.push(("INGRESS_ADDR".into(), format!("127.0.0.1:{port}")));
    let ingress = start(
        Path::new(env!("CARGO_BIN_EXE_ingress")),
        &ingress_env,
        ingress_log,
    );
    let mut worker_env: Vec<(String, String)> = p
        .worker_env()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    worker_env.extend(common.iter().cloned());
    worker_env.push(("PUBLIC_URL".into(), base.clone()));
    let worker = start(&worker_binary(), &worker_env, worker_log);

    let http = HttpClient::new(format!("127.0.0.1:{port}").parse().unwrap());
    let ready = eventually(Duration::from_secs(20), || async {
        let a = http.get("/readyz").await.ok()?;
        a.status.is_success().then_some(())
    })
    .await;
    assert!(ready.is_some(), "ingress binary ready");
    let post = |path: &'static str, body: &Value| {
        let http = http.clone();
        let body = http_build_query(body);
        async move { http.post(path, Some(FORM), body).await.unwrap() }
    };

    let mut secrets = vec![SEED_APP_TOKEN.to_string(), p.portal.client_secret()];
    // The installation, through the binaries.
    p.portal.mark_installed(SEED_APP_TOKEN);
    let install = p.install_event(SEED_MEMBER, &p.portal.domain());
    secrets.extend(pair_of(&install));
    assert_eq!(post("/events", &install).await.status, 200);
    let db = p.db_client().await;
    let installed = eventually(Duration::from_secs(30), || async {
        db.query_opt(
            "SELECT 1 FROM portals WHERE member_id = $1 AND status = 'installed'
               AND application_token_sha256 IS NOT NULL",
            &[&SEED_MEMBER],
        )
        .await
        .ok()?
    })
    .await;
    assert!(installed.is_some(), "installed by the worker binary");

    // The install page and a widget call, each with a user's own pair.
    let (auth_id, refresh_id) = p.portal.issue_tokens();
    let mut page = fixtures::install();
    page["member_id"] = json!(SEED_MEMBER);
    page["DOMAIN"] = json!(p.portal.addr().to_string());
    page["PROTOCOL"] = json!("0");
    page["AUTH_ID"] = json!(auth_id);
    page["REFRESH_ID"] = json!(refresh_id);
    secrets.extend([auth_id, refresh_id]);
    let (auth_id, refresh_id) = p.portal.issue_tokens();
    let mut widget = fixtures::placements()[1].clone();
    widget["member_id"] = json!(SEED_MEMBER);
    widget["AUTH_ID"] = json!(auth_id);
    widget["REFRESH_ID"] = json!(refresh_id);
    secrets.extend([auth_id, refresh_id]);
    // The seeds' own tokens (documentation values) are tokens too.
    secrets.extend(pair_of(&fixtures::deal_recurring_expose()));
    secrets.extend(
        ["AUTH_ID", "REFRESH_ID"].map(|k| fixtures::install()[k].as_str().unwrap().to_string()),
    );

    assert_eq!(post("/install", &page).await.status, 200);
    assert_eq!(post("/placement", &widget).await.status, 200);
    for id in 1..=3 {
        assert_eq!(
            post("/events", &fixtures::requisite_add_numbered(id))
                .await
                .status,
            200
        );
    }
    // The stored access token stops working: the worker refreshes it.
    p.portal.expire_access_tokens();
    assert_eq!(
        post("/events", &fixtures::deal_recurring_expose())
            .await
            .status,
        200
    );
    assert_eq!(
        post("/events", &p.seed(&fixtures::app_payment()))
            .await
            .status,
        200
    );
    let mut forged = fixtures::requisite_add();
    forged["auth"]["application_token"] = json!("f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0");
    secrets.push("f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0".into());
    assert_eq!(post("/events", &forged).await.status, 401);

    assert!(
        p.wait_events(
            "ONCRMDEALRECURRINGEXPOSE",
            "done",
            1,
            Duration::from_secs(60)
        )
        .await,
        "the recurring deal was fetched (after a refresh)"
    );
    assert!(
        p.wait_events("ONCRMREQUISITEADD", "done", 3, Duration::from_secs(30))
            .await
    );
    // Everything else settles, whatever its outcome.
    let _ = eventually(Duration::from_secs(20), || async {
        let row = db
            .query_one(
                "SELECT count(*) FROM events WHERE status IN ('processing', 'retrying')",
                &[],
            )
            .await
            .ok()?;
        (row.get::<_, i64>(0) == 0).then_some(())
    })
    .await;
    assert!(p.portal.refresh_count() >= 1, "a refresh happened");
    // Every access token the portal saw, the refreshed ones included, and the pair
    // stored last.
    secrets.extend(p.portal.calls().into_iter().filter_map(|c| c.token));
    if let Ok(row) = db
        .query_one(
            "SELECT access_token, refresh_token FROM portals WHERE member_id = $1",
            &[&SEED_MEMBER],
        )
        .await
    {
        secrets.extend(row.get::<_, Option<String>>(0));
        secrets.extend(row.get::<_, Option<String>>(1));
    }
    let (access, refresh) = p.stored_tokens(SEED_MEMBER).await;
    secrets.extend(access);
    secrets.extend(refresh);

    let worker_out = stop(worker).await;
    let ingress_out = stop(ingress).await;
    p.finish().await;

    // The level took effect (the ingress logs each queued message at debug; our own
    // code has no trace lines) and the worker did its work.
    assert!(
        ingress_out
            .lines()
            .any(|l| l.contains("DEBUG") && l.contains("queued")),
        "ingress logged nothing at debug:\n{ingress_out}"
    );
    assert!(
        worker_out.contains("installation proved and stored")
            && worker_out.contains("refreshed tokens"),
        "{worker_out}"
    );
    secrets.sort();
    secrets.dedup();
    secrets.retain(|s| s.len() >= 8);
    for (name, out) in [("ingress", &ingress_out), ("worker", &worker_out)] {
        for secret in &secrets {
            if let Some(line) = out.lines().find(|l| l.contains(secret.as_str())) {
                let shown: String = line
                    .replace(secret.as_str(), "<TOKEN>")
                    .chars()
                    .take(300)
                    .collect();
                panic!("{name} at RUST_LOG={level} printed a token: {shown}");
            }
        }
    }
}

#[tokio::test]
async fn no_token_reaches_the_logs_at_debug() {
    no_token_in_output_at("debug").await;
}

#[tokio::test]
async fn no_token_reaches_the_logs_at_trace() {
    no_token_in_output_at("trace").await;
}
