//! Calls on behalf of a stored portal: shared rate budget, backoff, method pauses,
//! redirects and single-flight token refresh. The thing a newcomer gets wrong: a
//! refresh token is single-use and a refresh kills the access token issued with it,
//! so a 401 must never lead two replicas to refresh at once. Here the portal's row
//! lock serializes refreshes, and a replica that finds a stored token different from
//! the one that failed uses that one instead of refreshing again.

use super::client::{Answer, RestClient};
use super::error::{B24Error, ErrorClass};
use super::limiter::Limiter;
use super::oauth::{self, OAuthApp};
use super::retry::{Retry, RetryPolicy};
use b24_shared::db::DbPool;
use b24_shared::Secret;
use serde_json::Value;
use std::time::Duration;
use url::Url;

#[derive(Clone)]
pub struct Bitrix {
    pub rest: RestClient,
    pool: DbPool,
    limiter: Limiter,
    oauth: Option<OAuthApp>,
    policy: RetryPolicy,
}

/// A portal's stored endpoint and tokens.
#[derive(Debug, Clone)]
pub struct StoredPortal {
    pub member_id: String,
    pub endpoint: Url,
    pub access_token: Secret,
    pub refresh_token: Secret,
    pub status: String,
}

/// Which token a call uses.
#[derive(Debug, Clone)]
pub enum Auth {
    /// The portal's stored pair, refreshed as needed.
    Stored,
    /// A token that came with the call (a widget's AUTH_ID, an install's AUTH_ID), used
    /// as is against the given endpoint; never refreshed, never stored by this call.
    Given { endpoint: Url, token: Secret },
}

/// Bitrix24's execution-time budget per method: 480 s of work per 10 minutes.
pub const OPERATING_BUDGET_SECS: f64 = 480.0;

/// Past 80% of the budget, each call waits from 0.5 s (at 80%) up to 5 s (at 100%).
pub fn slowdown(operating: f64) -> Option<Duration> {
    let used = operating / OPERATING_BUDGET_SECS;
    if used < 0.8 {
        return None;
    }
    let over = ((used - 0.8) / 0.2).clamp(0.0, 1.0);
    Some(Duration::from_secs_f64(0.5 + 4.5 * over))
}

fn db_error(e: impl std::fmt::Display) -> B24Error {
    B24Error::transient("DATABASE", e.to_string())
}

impl Bitrix {
    pub fn new(
        rest: RestClient,
        pool: DbPool,
        limiter: Limiter,
        oauth: Option<OAuthApp>,
        policy: RetryPolicy,
    ) -> Self {
        Self {
            rest,
            pool,
            limiter,
            oauth,
            policy,
        }
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    pub async fn load_portal(&self, member_id: &str) -> Result<Option<StoredPortal>, B24Error> {
        let client = self.pool.get().await.map_err(db_error)?;
        let row = client
            .query_opt(
                "SELECT client_endpoint, access_token, refresh_token, status
                   FROM portals WHERE member_id = $1",
                &[&member_id],
            )
            .await
            .map_err(db_error)?;
        let Some(row) = row else { return Ok(None) };
        let endpoint: String = row.get(0);
        Ok(Some(StoredPortal {
            member_id: member_id.to_string(),
            endpoint: self.rest.endpoint(&endpoint)?,
            access_token: Secret::new(row.get::<_, Option<String>>(1).unwrap_or_default()),
            refresh_token: Secret::new(row.get::<_, Option<String>>(2).unwrap_or_default()),
            status: row.get(3),
        }))
    }

    async fn usable_portal(&self, member_id: &str) -> Result<StoredPortal, B24Error> {
        let portal = self.load_portal(member_id).await?.ok_or_else(|| {
            B24Error::ours(
                ErrorClass::Permanent,
                "UNKNOWN_PORTAL",
                "portal is not installed",
            )
        })?;
        match portal.status.as_str() {
            "installed" if !portal.access_token.is_empty() => Ok(portal),
            "needs_reinstall" => Err(B24Error::ours(
                ErrorClass::Permanent,
                "NEEDS_REINSTALL",
                "portal's refresh token was refused; the app must be reinstalled",
            )),
            "deleted" => Err(B24Error::ours(
                ErrorClass::PortalGone,
                "PORTAL_DELETED",
                "portal was deleted",
            )),
            _ => Err(B24Error::ours(
                ErrorClass::Permanent,
                "NOT_INSTALLED",
                "portal has no tokens (uninstalled)",
            )),
        }
    }

    /// Calls `method` for the portal `member_id`: waits for the shared budget, retries
    /// transient failures with backoff, refreshes tokens once on a 401.
    pub async fn call(
        &self,
        member_id: &str,
        auth: &Auth,
        method: &str,
        params: &Value,
    ) -> Result<Answer, B24Error> {
        self.check_method_pause(member_id, method).await?;
        let mut retry = Retry::new(self.policy);
        let mut stored = match auth {
            Auth::Stored => Some(self.usable_portal(member_id).await?),
            Auth::Given { .. } => None,
        };
        let mut refreshed = false;
        let mut reread = false;
        loop {
            let (endpoint, token) = match (&stored, auth) {
                (Some(p), _) => (p.endpoint.clone(), p.access_token.clone()),
                (None, Auth::Given { endpoint, token }) => (endpoint.clone(), token.clone()),
                (None, Auth::Stored) => unreachable!("stored portal loaded above"),
            };
            let waited = self.limiter.acquire(member_id).await.map_err(db_error)?;
            self.rest
                .metrics()
                .limiter_wait
                .observe(waited.as_secs_f64());
            let err = match self.rest.call(&endpoint, &token, method, params).await {
                Ok(answer) => {
                    if let (Some(new), Some(_)) = (&answer.moved_to, &stored) {
                        self.store_endpoint(member_id, new).await?;
                    }
                    if let Some(time) = &answer.time {
                        self.record_operating(member_id, method, time).await;
                    }
                    return Ok(answer);
                }
                Err(e) => e,
            };
            let metrics = self.rest.metrics();
            match err.class {
                ErrorClass::NeedsRefresh => {
                    metrics.limit_hits.with_label_values(&["expired"]).inc();
                    let Some(current) = &stored else {
                        return Err(err);
                    };
                    if refreshed {
                        return Err(err);
                    }
                    refreshed = true;
                    stored = Some(self.refresh(current).await?);
                }
                ErrorClass::Permanent
                    if err.code == "NO_AUTH_FOUND" && !reread && stored.is_some() =>
                {
                    // Another replica may have replaced the pair; look once more.
                    reread = true;
                    let fresh = self.usable_portal(member_id).await?;
                    let same = stored
                        .as_ref()
                        .is_some_and(|s| fresh.access_token.ct_eq(s.access_token.expose()));
                    if same {
                        return Err(err);
                    }
                    stored = Some(fresh);
                }
                ErrorClass::RateLimited => {
                    metrics.limit_hits.with_label_values(&["query_limit"]).inc();
                    let delay = retry.next_delay().ok_or_else(|| err.clone())?;
                    self.limiter
                        .push_back(member_id, delay)
                        .await
                        .map_err(db_error)?;
                    tracing::warn!(
                        member_id,
                        method,
                        ?delay,
                        "QUERY_LIMIT_EXCEEDED; backing off"
                    );
                }
                ErrorClass::MethodPaused => {
                    metrics.limit_hits.with_label_values(&["time_limit"]).inc();
                    let pause = err.retry_after.unwrap_or(Duration::from_secs(60));
                    self.pause_method(member_id, method, pause).await;
                    let mut err = err;
                    err.retry_after = Some(pause);
                    return Err(err);
                }
                ErrorClass::Transient => {
                    let delay = retry.next_delay().ok_or_else(|| err.clone())?;
                    tracing::info!(member_id, method, code = %err.code, ?delay, "transient failure; retrying");
                    tokio::time::sleep(delay).await;
                }
                ErrorClass::PortalGone => {
                    self.set_status(member_id, "deleted").await;
                    return Err(err);
                }
                ErrorClass::Permanent | ErrorClass::NotRetryable => return Err(err),
            }
        }
    }

    async fn store_endpoint(&self, member_id: &str, endpoint: &Url) -> Result<(), B24Error> {
        let client = self.pool.get().await.map_err(db_error)?;
        client
            .execute(
                "UPDATE portals SET client_endpoint = $2, updated_at = now() WHERE member_id = $1",
                &[&member_id, &endpoint.as_str()],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn set_status(&self, member_id: &str, status: &str) {
        if let Ok(client) = self.pool.get().await {
            let _ = client
                .execute(
                    "UPDATE portals SET status = $2, updated_at = now() WHERE member_id = $1",
                    &[&member_id, &status],
                )
                .await;
        }
    }

    /// Single-flight refresh: lock the portal row, re-read, and refresh only if the
    /// stored token is still the one that failed.
    async fn refresh(&self, failed: &StoredPortal) -> Result<StoredPortal, B24Error> {
        let metrics = self.rest.metrics().refreshes.clone();
        let Some(app) = &self.oauth else {
            metrics.with_label_values(&["failed"]).inc();
            return Err(B24Error::ours(
                ErrorClass::Permanent,
                "NO_CLIENT_CREDENTIALS",
                "B24_CLIENT_ID and B24_CLIENT_SECRET are needed to refresh tokens",
            ));
        };
        let mut client = self.pool.get().await.map_err(db_error)?;
        let tx = client.transaction().await.map_err(db_error)?;
        let row = tx
            .query_opt(
                "SELECT access_token, refresh_token, client_endpoint, status
                   FROM portals WHERE member_id = $1 FOR UPDATE",
                &[&failed.member_id],
            )
            .await
            .map_err(db_error)?
            .ok_or_else(|| {
                B24Error::ours(ErrorClass::Permanent, "UNKNOWN_PORTAL", "portal vanished")
            })?;
        let access = Secret::new(row.get::<_, Option<String>>(0).unwrap_or_default());
        let refresh = Secret::new(row.get::<_, Option<String>>(1).unwrap_or_default());
        let endpoint: String = row.get(2);
        let status: String = row.get(3);
        if status != "installed" || refresh.is_empty() {
            metrics.with_label_values(&["failed"]).inc();
            return Err(B24Error::ours(
                ErrorClass::Permanent,
                "NOT_INSTALLED",
                "portal has no tokens",
            ));
        }
        if !access.ct_eq(failed.access_token.expose()) {
            // Someone refreshed while our call was failing: theirs is the live pair.
            tx.commit().await.map_err(db_error)?;
            metrics.with_label_values(&["reused"]).inc();
            return Ok(StoredPortal {
                access_token: access,
                refresh_token: refresh,
                endpoint: self.rest.endpoint(&endpoint)?,
                ..failed.clone()
            });
        }
        match oauth::refresh(self.rest.http(), app, &refresh).await {
            Ok(pair) => {
                let new_endpoint = pair
                    .client_endpoint
                    .as_deref()
                    .and_then(|e| self.rest.endpoint(e).ok())
                    .map(|u| u.to_string())
                    .unwrap_or(endpoint);
                let expires_in = pair.expires_in.unwrap_or(3600) as f64;
                tx.execute(
                    "UPDATE portals SET access_token = $2, refresh_token = $3,
                            expires_at = now() + make_interval(secs => $4),
                            client_endpoint = $5, updated_at = now()
                      WHERE member_id = $1",
                    &[
                        &failed.member_id,
                        &pair.access_token.expose(),
                        &pair.refresh_token.expose(),
                        &expires_in,
                        &new_endpoint,
                    ],
                )
                .await
                .map_err(db_error)?;
                tx.commit().await.map_err(db_error)?;
                metrics.with_label_values(&["refreshed"]).inc();
                tracing::info!(member_id = %failed.member_id, "refreshed tokens");
                Ok(StoredPortal {
                    endpoint: self.rest.endpoint(&new_endpoint)?,
                    access_token: pair.access_token,
                    refresh_token: pair.refresh_token,
                    ..failed.clone()
                })
            }
            Err(e) if e.code == "invalid_grant" => {
                tx.execute(
                    "UPDATE portals SET status = 'needs_reinstall', updated_at = now()
                      WHERE member_id = $1",
                    &[&failed.member_id],
                )
                .await
                .map_err(db_error)?;
                tx.commit().await.map_err(db_error)?;
                metrics.with_label_values(&["invalid_grant"]).inc();
                tracing::error!(member_id = %failed.member_id, "refresh token refused; portal needs re-install");
                Err(e)
            }
            Err(e) => {
                metrics.with_label_values(&["failed"]).inc();
                Err(e)
            }
        }
    }

    /// Refuses a call to a method that is paused for this portal (after a 429), and
    /// slows calls to a method that has used more than 80% of its execution-time
    /// budget in the current window, so the 429 comes late or not at all.
    pub async fn check_method_pause(&self, member_id: &str, method: &str) -> Result<(), B24Error> {
        let client = self.pool.get().await.map_err(db_error)?;
        let row = client
            .query_opt(
                "SELECT greatest(0, extract(epoch FROM (paused_until - now())))::float8,
                        CASE WHEN operating_reset_at > now() THEN operating ELSE 0 END
                   FROM method_budgets
                  WHERE member_id = $1 AND method = $2",
                &[&member_id, &method],
            )
            .await
            .map_err(db_error)?;
        drop(client);
        let Some(row) = row else { return Ok(()) };
        let paused: Option<f64> = row.get(0);
        if let Some(secs) = paused.filter(|s| *s > 0.0) {
            let mut e = B24Error::ours(
                ErrorClass::MethodPaused,
                "OPERATION_TIME_LIMIT",
                format!("{method} is paused for this portal"),
            );
            e.retry_after = Some(Duration::from_secs_f64(secs));
            return Err(e);
        }
        let operating: f64 = row.get(1);
        if let Some(delay) = slowdown(operating) {
            tracing::debug!(
                member_id,
                method,
                operating,
                ?delay,
                "method near its time budget; slowing down"
            );
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }

    pub async fn pause_method(&self, member_id: &str, method: &str, pause: Duration) {
        if let Ok(client) = self.pool.get().await {
            let _ = client
                .execute(
                    "INSERT INTO method_budgets (member_id, method, paused_until)
                     VALUES ($1, $2, now() + make_interval(secs => $3))
                     ON CONFLICT (member_id, method)
                     DO UPDATE SET paused_until = EXCLUDED.paused_until",
                    &[&member_id, &method, &pause.as_secs_f64()],
                )
                .await;
        }
    }

    /// Keeps Bitrix24's `time.operating` for the method, so calls slow down before
    /// the method's execution-time budget is spent (see `check_method_pause`).
    /// `time` is an answer's `time` block, or a batch command's `result_time` entry.
    pub async fn record_operating(&self, member_id: &str, method: &str, time: &Value) {
        let operating = time.get("operating").and_then(Value::as_f64);
        let reset = time.get("operating_reset_at").and_then(Value::as_f64);
        let (Some(operating), Some(reset)) = (operating, reset) else {
            return;
        };
        if let Ok(client) = self.pool.get().await {
            let _ = client
                .execute(
                    "INSERT INTO method_budgets (member_id, method, operating, operating_reset_at)
                     VALUES ($1, $2, $3, to_timestamp($4))
                     ON CONFLICT (member_id, method)
                     DO UPDATE SET operating = EXCLUDED.operating,
                                   operating_reset_at = EXCLUDED.operating_reset_at",
                    &[&member_id, &method, &operating, &reset],
                )
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_slow_down_only_past_eighty_percent_of_the_budget() {
        assert_eq!(slowdown(0.0), None);
        assert_eq!(slowdown(0.79 * OPERATING_BUDGET_SECS), None);
        assert_eq!(
            slowdown(0.8 * OPERATING_BUDGET_SECS),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            slowdown(OPERATING_BUDGET_SECS),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            slowdown(2.0 * OPERATING_BUDGET_SECS),
            Some(Duration::from_secs(5))
        );
    }
}
