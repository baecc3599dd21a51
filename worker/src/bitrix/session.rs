//! Calls on behalf of a stored portal: the shared budget, backoff, method pauses,
//! redirects, the portal's lifecycle answers (`PAYMENT_REQUIRED`, `PORTAL_DELETED`)
//! and single-flight token refresh.
//!
//! The thing a newcomer gets wrong: a refresh token is single-use and a refresh kills
//! the access token issued with it, so a 401 must never lead two replicas to refresh at
//! once. The portal's row lock serializes refreshes, and a replica that finds a stored
//! token different from the one that failed uses that one instead of refreshing again.
//! And an expired token is never a reason to give an event up: only a refused refresh
//! (`invalid_grant`) stops a portal, and then its events wait for the reinstall.

use super::client::{Answer, RestClient};
use super::error::{B24Error, ErrorClass};
use super::hosts::domain_of;
use super::limiter::{Limiter, Slot};
use super::oauth::{self, OAuthApp, TokenPair};
use super::retry::{Retry, RetryPolicy};
use crate::crypto::{Opened, TokenCipher};
use b24_shared::db::DbPool;
use b24_shared::event::MemberId;
use b24_shared::portals::{self, Portal, PortalStatus};
use b24_shared::Secret;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// How long messages of a portal that cannot be called wait before they look again.
pub const HOLD: Duration = Duration::from_secs(600);

/// Refreshes one call may make when tokens keep expiring under it; then it is retried
/// later like any transient failure (never dead-lettered for it).
const MAX_REFRESHES_PER_CALL: u32 = 3;

/// How long a method stays paused after 429 when Bitrix24 gave no reset time.
const DEFAULT_METHOD_PAUSE: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Bitrix {
    pub rest: RestClient,
    pool: DbPool,
    limiter: Limiter,
    oauth: Option<OAuthApp>,
    cipher: Arc<TokenCipher>,
    policy: RetryPolicy,
    /// How long `PORTAL_DELETED` must keep coming before the portal is marked deleted.
    deleted_grace: Duration,
}

/// A stored portal, ready to be called: its endpoint and its opened access token.
#[derive(Debug, Clone)]
pub struct Session {
    pub member_id: MemberId,
    pub endpoint: Url,
    pub access_token: Secret,
    /// `PORTAL_DELETED` was seen lately: a successful call clears it.
    gone: bool,
}

/// Which token a call uses.
#[derive(Debug, Clone)]
pub enum Auth {
    /// The portal's stored pair, refreshed as needed.
    Stored,
    /// The stored pair even while the portal is held for payment: the `app.info` that
    /// checks whether it has been paid. `PAYMENT_REQUIRED` comes back as an error of
    /// class `PaymentRequired`, not as a hold.
    StoredPaymentCheck,
    /// A widget user's own `AUTH_ID`, against the stored portal's endpoint: used as is,
    /// never refreshed, never stored.
    User { endpoint: Url, token: Secret },
}

/// What a call does when the portal's budget is saturated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Budget {
    /// Hands the message back to a delay queue rather than hold its slot.
    HandBack,
    /// Waits.
    Patient,
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

pub fn db_error(e: impl std::fmt::Display) -> B24Error {
    B24Error::transient("DATABASE", e.to_string())
}

impl Bitrix {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rest: RestClient,
        pool: DbPool,
        limiter: Limiter,
        oauth: Option<OAuthApp>,
        cipher: Arc<TokenCipher>,
        policy: RetryPolicy,
        deleted_grace: Duration,
    ) -> Self {
        Self {
            rest,
            pool,
            limiter,
            oauth,
            cipher,
            policy,
            deleted_grace,
        }
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    pub fn cipher(&self) -> &TokenCipher {
        &self.cipher
    }

    pub fn pool(&self) -> &DbPool {
        &self.pool
    }

    /// The application's OAuth credentials, or why there are none.
    pub fn oauth(&self) -> Result<&OAuthApp, B24Error> {
        self.oauth.as_ref().ok_or_else(|| {
            B24Error::held(
                "NO_CLIENT_CREDENTIALS",
                "B24_CLIENT_ID and B24_CLIENT_SECRET are needed to verify and refresh tokens",
                HOLD,
            )
        })
    }

    /// Refreshes `refresh_token` at the authorization server for `server_endpoint`.
    /// The caller owns the outcome: an installation's proof, or [`Self::refresh`].
    pub async fn refresh_at(
        &self,
        server_endpoint: Option<&str>,
        refresh_token: &Secret,
    ) -> Result<TokenPair, B24Error> {
        let app = self.oauth()?;
        let url = app.token_url(server_endpoint, self.rest.allowed_hosts())?;
        oauth::refresh(self.rest.http(), app, &url, refresh_token).await
    }

    /// The portal's stored state as a callable session, or why it cannot be called.
    pub async fn session(&self, member_id: &MemberId) -> Result<Session, B24Error> {
        self.session_of(&self.load(member_id).await?).await
    }

    /// Like [`Self::session`], but a portal held for payment may be called.
    async fn session_for_check(&self, member_id: &MemberId) -> Result<Session, B24Error> {
        let mut portal = self.load(member_id).await?;
        if portal.status == PortalStatus::PaymentRequired {
            portal.status = PortalStatus::Installed;
        }
        self.session_of(&portal).await
    }

    async fn load(&self, member_id: &MemberId) -> Result<Portal, B24Error> {
        let client = self.pool.get().await.map_err(db_error)?;
        portals::find(&client, member_id)
            .await
            .map_err(db_error)?
            .ok_or_else(|| {
                B24Error::ours(
                    ErrorClass::Permanent,
                    "UNKNOWN_PORTAL",
                    "portal is not installed",
                )
            })
    }

    async fn session_of(&self, portal: &Portal) -> Result<Session, B24Error> {
        callable(portal)?;
        let access = portal.access_token.as_ref().ok_or_else(|| {
            B24Error::ours(
                ErrorClass::Permanent,
                "NOT_INSTALLED",
                "portal has no tokens (uninstalled)",
            )
        })?;
        let access = self
            .cipher
            .open(&portal.member_id, access)
            .map_err(|e| B24Error::held("TOKEN_KEY", e.to_string(), HOLD))?
            .secret();
        Ok(Session {
            member_id: portal.member_id.clone(),
            endpoint: self.rest.endpoint(&portal.client_endpoint)?,
            access_token: access,
            gone: portal.gone_since.is_some(),
        })
    }

    /// Calls `method` for the portal: waits for the shared budget (or hands the message
    /// back when the wait would be long), retries transient failures with backoff,
    /// refreshes tokens on 401, and turns the portal's lifecycle answers into waiting.
    pub async fn call(
        &self,
        member_id: &MemberId,
        auth: &Auth,
        method: &str,
        params: &Value,
    ) -> Result<Answer, B24Error> {
        self.call_with(member_id, auth, method, params, Budget::HandBack)
            .await
    }

    /// Like [`Self::call`], but waits for the budget however long it takes: for work
    /// that holds no message slot and would lose progress if handed back (an
    /// installation's proof and bindings, the reconciler).
    pub async fn call_patiently(
        &self,
        member_id: &MemberId,
        auth: &Auth,
        method: &str,
        params: &Value,
    ) -> Result<Answer, B24Error> {
        self.call_with(member_id, auth, method, params, Budget::Patient)
            .await
    }

    async fn call_with(
        &self,
        member_id: &MemberId,
        auth: &Auth,
        method: &str,
        params: &Value,
        budget: Budget,
    ) -> Result<Answer, B24Error> {
        self.check_method_pause(member_id, method).await?;
        let mut retry = Retry::new(self.policy);
        let mut session = match auth {
            Auth::Stored => Some(self.session(member_id).await?),
            Auth::StoredPaymentCheck => Some(self.session_for_check(member_id).await?),
            Auth::User { .. } => None,
        };
        let mut refreshes = 0;
        let mut reread = false;
        loop {
            let (endpoint, token) = match (&session, auth) {
                (Some(s), _) => (&s.endpoint, &s.access_token),
                (None, Auth::User { endpoint, token }) => (endpoint, token),
                (None, Auth::Stored | Auth::StoredPaymentCheck) => {
                    unreachable!("a stored call has its session")
                }
            };
            self.wait_for_budget(member_id, budget).await?;
            let err = match self.rest.call(endpoint, token, method, params).await {
                Ok(answer) => {
                    if let Some(s) = &session {
                        self.after_success(s, &answer).await;
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
                ErrorClass::NeedsRefresh | ErrorClass::Permanent
                    if session.is_some()
                        && (err.class == ErrorClass::NeedsRefresh
                            || (err.code == "NO_AUTH_FOUND" && !reread)) =>
                {
                    metrics.limit_hits.with_label_values(&["expired"]).inc();
                    if err.code == "NO_AUTH_FOUND" {
                        reread = true;
                    }
                    if refreshes >= MAX_REFRESHES_PER_CALL {
                        return Err(B24Error::transient(
                            &err.code,
                            "tokens kept expiring during the call; retrying later",
                        ));
                    }
                    refreshes += 1;
                    let failed = session
                        .as_ref()
                        .map(|s| s.access_token.clone())
                        .unwrap_or_default();
                    session = Some(self.refresh(member_id, &failed).await?);
                }
                ErrorClass::RateLimited => {
                    metrics.limit_hits.with_label_values(&["query_limit"]).inc();
                    let delay = retry.next_delay().ok_or_else(|| err.clone())?;
                    self.limiter
                        .limit_hit(member_id, delay)
                        .await
                        .map_err(db_error)?;
                    tracing::warn!(%member_id, method, ?delay, "QUERY_LIMIT_EXCEEDED; slowing the portal down");
                }
                ErrorClass::MethodPaused => {
                    metrics.limit_hits.with_label_values(&["time_limit"]).inc();
                    let pause = self.pause_method(member_id, method).await;
                    let mut err = err;
                    err.retry_after = Some(pause);
                    return Err(err);
                }
                ErrorClass::Transient => {
                    let delay = retry.next_delay().ok_or_else(|| err.clone())?;
                    tracing::info!(%member_id, method, code = %err.code, ?delay, "transient failure; retrying");
                    tokio::time::sleep(delay).await;
                }
                ErrorClass::PaymentRequired if session.is_some() => {
                    let held = self.payment_required(member_id).await;
                    return Err(match auth {
                        Auth::StoredPaymentCheck => err,
                        _ => held,
                    });
                }
                ErrorClass::PortalGone if session.is_some() => {
                    return Err(self.portal_gone(member_id).await);
                }
                _ => return Err(err),
            }
        }
    }

    /// Waits for a slot of the portal's budget, or hands the message back when the
    /// budget is saturated for longer than the configured wait.
    async fn wait_for_budget(&self, member_id: &MemberId, budget: Budget) -> Result<(), B24Error> {
        let metrics = self.rest.metrics();
        if budget == Budget::Patient {
            let waited = self
                .limiter
                .acquire_patiently(member_id)
                .await
                .map_err(db_error)?;
            metrics.limiter_wait.observe(waited.as_secs_f64());
            return Ok(());
        }
        let slot = self.limiter.acquire(member_id).await.map_err(db_error)?;
        match slot {
            Slot::After(waited) => {
                metrics.limiter_wait.observe(waited.as_secs_f64());
                Ok(())
            }
            Slot::Saturated(wait) => {
                metrics.limit_hits.with_label_values(&["saturated"]).inc();
                // Back after the shortest delay, not after `wait`: each held message
                // computed its wait alone, and they all come back together.
                Err(B24Error::held(
                    "BUDGET_SATURATED",
                    format!(
                        "the portal's budget is taken for {:.1} s",
                        wait.as_secs_f64()
                    ),
                    wait.min(b24_shared::amqp::RETRY_DELAYS[0]),
                ))
            }
        }
    }

    /// A call of a stored session went through: follow a move, forget a closure.
    async fn after_success(&self, s: &Session, answer: &Answer) {
        let Ok(client) = self.pool.get().await else {
            return;
        };
        if let Some(new) = &answer.moved_to {
            if let Some(domain) = domain_of(new) {
                match portals::moved(&client, &s.member_id, new.as_str(), &domain).await {
                    Ok(true) => {
                        tracing::info!(member_id = %s.member_id, %domain, "portal moved; endpoint and domain updated")
                    }
                    Ok(false) => tracing::error!(
                        member_id = %s.member_id, %domain,
                        "portal moved to a domain another live portal holds; not recorded"
                    ),
                    Err(e) => tracing::warn!(error = %e, "could not record the portal's move"),
                }
            }
        }
        if s.gone {
            let _ = portals::clear_gone(&client, &s.member_id).await;
        }
    }

    /// `PAYMENT_REQUIRED`: the portal's events wait, without calls, until it is paid.
    async fn payment_required(&self, member_id: &MemberId) -> B24Error {
        if let Ok(client) = self.pool.get().await {
            if let Err(e) =
                portals::set_status(&client, member_id, PortalStatus::PaymentRequired).await
            {
                tracing::warn!(error = %e, "could not mark the portal payment_required");
            }
        }
        tracing::warn!(%member_id, "PAYMENT_REQUIRED: holding the portal's events until it is paid");
        B24Error::held(
            "PAYMENT_REQUIRED",
            "the application is not paid for on this portal",
            HOLD,
        )
    }

    /// `PORTAL_DELETED`: self-hosted portals answer it while closed for a while, so the
    /// portal is marked deleted only when it keeps answering so beyond the grace.
    async fn portal_gone(&self, member_id: &MemberId) -> B24Error {
        let since = match self.pool.get().await {
            Ok(client) => portals::note_gone(&client, member_id).await.ok(),
            Err(_) => None,
        };
        match since {
            Some(since) if since >= self.deleted_grace => {
                if let Ok(client) = self.pool.get().await {
                    let _ = portals::set_status(&client, member_id, PortalStatus::Deleted).await;
                    let _ = portals::audit(
                        &client,
                        member_id,
                        "deleted",
                        serde_json::json!({"gone_for_s": since.as_secs()}),
                    )
                    .await;
                }
                tracing::error!(%member_id, ?since, "PORTAL_DELETED beyond the grace period; portal marked deleted");
                B24Error::ours(
                    ErrorClass::PortalGone,
                    "PORTAL_DELETED",
                    "portal was deleted",
                )
            }
            since => {
                let left = since
                    .map(|s| self.deleted_grace.saturating_sub(s))
                    .unwrap_or(HOLD);
                B24Error::held(
                    "PORTAL_DELETED",
                    "portal answers PORTAL_DELETED; waiting in case it reopens",
                    left.min(HOLD).max(Duration::from_secs(5)),
                )
            }
        }
    }

    /// Single-flight refresh: lock the portal row, re-read, and refresh only if the
    /// stored token is still the one that failed.
    async fn refresh(&self, member_id: &MemberId, failed: &Secret) -> Result<Session, B24Error> {
        let metrics = self.rest.metrics().refreshes.clone();
        let outcome = self.refresh_locked(member_id, failed).await;
        let label = match &outcome {
            Ok((_, true)) => "refreshed",
            Ok((_, false)) => "reused",
            Err(e) if e.code == "invalid_grant" => "invalid_grant",
            Err(_) => "failed",
        };
        metrics.with_label_values(&[label]).inc();
        outcome.map(|(s, _)| s)
    }

    /// The session after the refresh, and whether this call refreshed (false: another
    /// replica had).
    async fn refresh_locked(
        &self,
        member_id: &MemberId,
        failed: &Secret,
    ) -> Result<(Session, bool), B24Error> {
        let app = self.oauth()?;
        let mut client = self.pool.get().await.map_err(db_error)?;
        let tx = client.transaction().await.map_err(db_error)?;
        let portal = portals::lock(&tx, member_id)
            .await
            .map_err(db_error)?
            .ok_or_else(|| {
                B24Error::ours(ErrorClass::Permanent, "UNKNOWN_PORTAL", "portal vanished")
            })?;
        let current = self.session_of(&portal).await?;
        if !current.access_token.ct_eq(failed.expose()) {
            // Someone refreshed while our call was failing: theirs is the live pair.
            tx.commit().await.map_err(db_error)?;
            return Ok((current, false));
        }
        let refresh = portal
            .refresh_token
            .as_ref()
            .map(|r| self.cipher.open(member_id, r).map(Opened::secret))
            .transpose()
            .map_err(|e| B24Error::held("TOKEN_KEY", e.to_string(), HOLD))?
            .ok_or_else(|| {
                B24Error::ours(
                    ErrorClass::Permanent,
                    "NOT_INSTALLED",
                    "portal has no tokens",
                )
            })?;
        let url = app.token_url(portal.server_endpoint.as_deref(), self.rest.allowed_hosts())?;
        let pair = match oauth::refresh(self.rest.http(), app, &url, &refresh).await {
            Ok(pair) => pair,
            Err(e) => {
                let status = match e.class {
                    _ if e.code == "invalid_grant" => Some(PortalStatus::NeedsReinstall),
                    ErrorClass::PaymentRequired => Some(PortalStatus::PaymentRequired),
                    _ => None,
                };
                let Some(status) = status else {
                    // Transient (retried later) or a misconfiguration (invalid_client):
                    // the portal's events wait rather than die.
                    if e.class.is_retryable() {
                        return Err(e);
                    }
                    tracing::error!(%member_id, code = %e.code, "token refresh refused; check B24_CLIENT_ID/B24_CLIENT_SECRET");
                    return Err(B24Error::held(&e.code, e.description, HOLD));
                };
                portals::set_status(&tx, member_id, status)
                    .await
                    .map_err(db_error)?;
                portals::audit(
                    &tx,
                    member_id,
                    "refresh_refused",
                    serde_json::json!({"code": e.code, "status": status.as_str()}),
                )
                .await
                .map_err(db_error)?;
                tx.commit().await.map_err(db_error)?;
                tracing::error!(%member_id, code = %e.code, %status, "refresh refused; holding the portal's events");
                return Err(B24Error::held(&e.code, e.description, HOLD));
            }
        };
        pair.check_member(member_id)?;
        // The authorization server's word on where the portal lives now.
        let moved = pair
            .client_endpoint
            .as_deref()
            .and_then(|e| self.rest.endpoint(e).ok())
            .filter(|u| *u != current.endpoint)
            .and_then(|u| domain_of(&u).map(|d| (u.to_string(), d)));
        portals::store_tokens(
            &tx,
            member_id,
            &self.cipher.seal(member_id, &pair.access_token),
            &self.cipher.seal(member_id, &pair.refresh_token),
            pair.expires_in.unwrap_or(3600),
            moved.as_ref().map(|(e, d)| (e.as_str(), d.as_str())),
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        tracing::info!(%member_id, "refreshed tokens");
        let endpoint = match &moved {
            Some((e, _)) => self.rest.endpoint(e)?,
            None => current.endpoint,
        };
        Ok((
            Session {
                member_id: member_id.clone(),
                endpoint,
                access_token: pair.access_token,
                gone: current.gone,
            },
            true,
        ))
    }

    /// Refreshes a portal's pair now, whether or not a call failed (a quiet portal's
    /// refresh token must not reach its 180 days).
    pub async fn refresh_now(&self, member_id: &MemberId) -> Result<(), B24Error> {
        let current = self.session(member_id).await?;
        self.refresh(member_id, &current.access_token)
            .await
            .map(|_| ())
    }

    /// Refuses a call to a method that is paused for this portal (after a 429), and
    /// slows calls to a method that has used more than 80% of its execution-time
    /// budget in the current window, so the 429 comes late or not at all.
    pub async fn check_method_pause(
        &self,
        member_id: &MemberId,
        method: &str,
    ) -> Result<(), B24Error> {
        let client = self.pool.get().await.map_err(db_error)?;
        let row = client
            .query_opt(
                "SELECT greatest(0, extract(epoch FROM (paused_until - now())))::float8,
                        CASE WHEN operating_reset_at > now() THEN operating ELSE 0 END
                   FROM method_budgets
                  WHERE member_id = $1 AND method = $2",
                &[member_id, &method],
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
            tracing::debug!(%member_id, method, operating, ?delay, "method near its time budget; slowing down");
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }

    /// After 429 `OPERATION_TIME_LIMIT`: the method is paused for the portal until its
    /// budget resets (`operating_reset_at`, when Bitrix24 told us one), or for a minute.
    /// Returns the pause.
    pub async fn pause_method(&self, member_id: &MemberId, method: &str) -> Duration {
        let paused = match self.pool.get().await {
            Ok(client) => client
                .query_one(
                    "INSERT INTO method_budgets (member_id, method, paused_until)
                     VALUES ($1, $2, now() + make_interval(secs => $3))
                     ON CONFLICT (member_id, method) DO UPDATE SET paused_until =
                         CASE WHEN method_budgets.operating_reset_at > now()
                              THEN method_budgets.operating_reset_at
                              ELSE EXCLUDED.paused_until END
                     RETURNING extract(epoch FROM paused_until - now())::float8",
                    &[member_id, &method, &DEFAULT_METHOD_PAUSE.as_secs_f64()],
                )
                .await
                .ok()
                .map(|r| r.get::<_, f64>(0)),
            Err(_) => None,
        };
        paused
            .map(|s| Duration::from_secs_f64(s.max(1.0)))
            .unwrap_or(DEFAULT_METHOD_PAUSE)
    }

    /// Keeps Bitrix24's `time.operating` for the method, so calls slow down before
    /// the method's execution-time budget is spent (see `check_method_pause`).
    /// `time` is an answer's `time` block, or a batch command's `result_time` entry;
    /// either field may be missing (the docs' batch example has neither).
    pub async fn record_operating(&self, member_id: &MemberId, method: &str, time: &Value) {
        let operating = time.get("operating").and_then(Value::as_f64);
        let reset = time.get("operating_reset_at").and_then(Value::as_f64);
        if operating.is_none() && reset.is_none() {
            return;
        }
        if let Ok(client) = self.pool.get().await {
            let _ = client
                .execute(
                    "INSERT INTO method_budgets (member_id, method, operating, operating_reset_at)
                     VALUES ($1, $2, coalesce($3::float8, 0), to_timestamp($4::float8))
                     ON CONFLICT (member_id, method)
                     DO UPDATE SET operating = coalesce($3::float8, method_budgets.operating),
                                   operating_reset_at = coalesce(to_timestamp($4::float8),
                                                                 method_budgets.operating_reset_at)",
                    &[member_id, &method, &operating, &reset],
                )
                .await;
        }
    }
}

/// Why a stored portal cannot be called now, if it cannot.
pub fn callable(portal: &Portal) -> Result<(), B24Error> {
    match portal.status {
        PortalStatus::Installed => Ok(()),
        PortalStatus::PaymentRequired => Err(B24Error::held(
            "PAYMENT_REQUIRED",
            "the application is not paid for on this portal",
            HOLD,
        )),
        PortalStatus::NeedsReinstall => Err(B24Error::held(
            "NEEDS_REINSTALL",
            "the portal's refresh token was refused; the app must be reinstalled",
            HOLD,
        )),
        PortalStatus::Deleted => Err(B24Error::ours(
            ErrorClass::PortalGone,
            "PORTAL_DELETED",
            "portal was deleted",
        )),
        PortalStatus::Uninstalled => Err(B24Error::ours(
            ErrorClass::Permanent,
            "NOT_INSTALLED",
            "portal has no tokens (uninstalled)",
        )),
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
