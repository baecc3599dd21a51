//! Sends the Bitrix24 documentation's seed events through a running deployment (the
//! docker-compose stack, say) with a simulated portal standing in for Bitrix24, and
//! waits until the workers made every REST call the seeds need. Run on the host:
//!
//!   STACK_INGRESS=127.0.0.1:8080 STACK_PORTAL_BIND=10.89.0.1:18099 \
//!   STACK_PORTAL_HOST=host.containers.internal cargo run -p b24-tests --bin stack_seed
//!
//! The portal's OAuth server listens on the next port. The workers must be
//! configured for that portal: `B24_OAUTH_URL` pointing at its OAuth server,
//! `B24_ALLOWED_HOSTS` allowing it, and the simulated application's credentials
//! (`B24_CLIENT_ID=local.b24pipeline.sim`, `B24_CLIENT_SECRET=sim-client-secret`).

use anyhow::{bail, ensure, Context};
use b24_tests::fixtures;
use b24_tests::http::{HttpClient, FORM};
use b24_tests::phpform::http_build_query;
use b24_tests::pipeline::{seed_for, SEED_APP_TOKEN, SEED_MEMBER};
use b24_tests::portal::{PortalConfig, SimPortal};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let var = |k: &str| std::env::var(k).with_context(|| format!("{k} is not set"));
    let ingress = HttpClient::new(var("STACK_INGRESS")?.parse()?);
    let bind: SocketAddr = var("STACK_PORTAL_BIND")?.parse()?;
    // The OAuth server is another host for Bitrix24: here the next port.
    let oauth_bind = SocketAddr::new(bind.ip(), bind.port() + 1);
    let portal = SimPortal::try_start_at(
        PortalConfig {
            member_id: SEED_MEMBER.into(),
            ..PortalConfig::default()
        },
        bind,
        oauth_bind,
        Some(&var("STACK_PORTAL_HOST")?),
    )
    .await?;
    // Our application counts as installed with the seeds' application_token, as the
    // pipeline's own tests have it.
    portal.mark_installed(SEED_APP_TOKEN);
    portal.set_app_info(json!({"STATUS": "P", "PAYMENT_EXPIRED": "N", "DAYS": 28}));
    println!(
        "simulated portal: {} (OAuth {})",
        portal.client_endpoint(),
        portal.oauth_url()
    );

    let (access, refresh) = portal.issue_tokens();
    let install = json!({
        "event": "ONAPPINSTALL",
        "data": {"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"},
        "ts": "1741092400",
        "auth": {
            "access_token": access, "expires_in": "3600", "scope": "crm",
            "domain": portal.domain(), "server_endpoint": portal.server_endpoint(),
            "status": "L", "client_endpoint": portal.client_endpoint(),
            "member_id": SEED_MEMBER, "refresh_token": refresh,
            "application_token": SEED_APP_TOKEN,
        }
    });
    let post = |path: &'static str, payload: Value| {
        let ingress = ingress.clone();
        async move {
            let a = ingress
                .post(path, Some(FORM), http_build_query(&payload))
                .await?;
            println!(
                "POST {path} {} -> {} {}",
                payload["event"]
                    .as_str()
                    .or(payload["PLACEMENT"].as_str())
                    .unwrap_or("?"),
                a.status,
                a.body.lines().next().unwrap_or("")
            );
            ensure!(a.status == 200, "POST {path} answered {}", a.status);
            anyhow::Ok(())
        }
    };
    post("/events", install).await?;
    wait_calls(
        &portal,
        &[("event.bind", 1), ("placement.bind", 1)],
        Duration::from_secs(60),
    )
    .await?;
    println!("installed: the workers bound the events and widgets");

    post(
        "/events",
        seed_for(&portal, &fixtures::deal_recurring_expose()),
    )
    .await?;
    post("/events", seed_for(&portal, &fixtures::requisite_add())).await?;
    post("/events", seed_for(&portal, &fixtures::app_payment())).await?;
    let placements = fixtures::placements();
    let n_placements = placements.len();
    for call in placements {
        post("/placement", seed_for(&portal, &call)).await?;
    }
    wait_calls(
        &portal,
        &[
            ("crm.deal.get", 1),
            ("crm.deal.recurring.get", 1),
            ("crm.requisite.get", 1),
            ("app.info", 2),
            ("crm.item.get", n_placements),
        ],
        Duration::from_secs(120),
    )
    .await?;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for c in portal.calls() {
        *seen
            .entry(format!("{} {}", c.method, c.status))
            .or_default() += 1;
    }
    println!("REST calls the portal answered (method status: count): {seen:?}");
    // The rows are committed right after the last answer: a moment for the last acks.
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("every seed's REST calls were made");
    Ok(())
}

/// Waits until the portal saw at least this many calls of each method.
async fn wait_calls(
    portal: &SimPortal,
    want: &[(&str, usize)],
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let calls = portal.calls();
        let missing: Vec<String> = want
            .iter()
            .filter_map(|(m, n)| {
                let got = calls
                    .iter()
                    .filter(|c| c.method == *m && c.status == 200)
                    .count();
                (got < *n).then(|| format!("{m}: {got} of {n}"))
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the portal did not see every call within {within:?}: {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
