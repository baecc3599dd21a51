//! The `portals` table: one row per Bitrix24 account (member_id), its one row type
//! [`Portal`], its status [`PortalStatus`], and every query on it. Nothing else in the
//! workspace writes SQL against `portals`.
//!
//! What a newcomer gets wrong: a row is changed only by what proved itself. Tokens, the
//! application_token and the host change only through a verified installation (the
//! worker's install handler) or through answers of Bitrix24's own servers (a refresh, a
//! redirect); an event body never changes a row by what it claims. Tokens are stored
//! sealed ([`Sealed`]; the worker holds the key) and the application_token only as its
//! SHA-256, compared in constant time.

use crate::event::MemberId;
use crate::Secret;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use postgres_types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use sha2::{Digest, Sha256};
use std::fmt;
use subtle::ConstantTimeEq;
use tokio_postgres::Row;

/// Where a portal stands. Stored as text; every status the code writes is here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortalStatus {
    /// Verified installation with working tokens.
    Installed,
    /// The refresh token was refused (`invalid_grant`): only a reinstall helps. Events
    /// wait in the delay queues meanwhile.
    NeedsReinstall,
    /// Bitrix24 answered `PAYMENT_REQUIRED`: events are held without calls until the app
    /// is paid (`ONAPPPAYMENT`, or a periodic `app.info`).
    PaymentRequired,
    /// `ONAPPUNINSTALL`: tokens erased.
    Uninstalled,
    /// `PORTAL_DELETED` kept coming for longer than the grace period.
    Deleted,
}

impl PortalStatus {
    pub const ALL: [PortalStatus; 5] = [
        Self::Installed,
        Self::NeedsReinstall,
        Self::PaymentRequired,
        Self::Uninstalled,
        Self::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Installed => "installed",
            Self::NeedsReinstall => "needs_reinstall",
            Self::PaymentRequired => "payment_required",
            Self::Uninstalled => "uninstalled",
            Self::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The portal holds tokens and the app is on it (possibly unpaid or needing a
    /// reinstall): its domain is taken, its events are kept.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            Self::Installed | Self::NeedsReinstall | Self::PaymentRequired
        )
    }
}

impl fmt::Display for PortalStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Stores a type as its text form: `$ty::as_str` out, `$parse` back in.
macro_rules! text_sql {
    ($ty:ty, $parse:expr) => {
        impl ToSql for $ty {
            fn to_sql(
                &self,
                ty: &Type,
                out: &mut bytes::BytesMut,
            ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
                self.as_str().to_sql(ty, out)
            }

            fn accepts(ty: &Type) -> bool {
                <&str as ToSql>::accepts(ty)
            }

            to_sql_checked!();
        }

        impl<'a> FromSql<'a> for $ty {
            fn from_sql(
                ty: &Type,
                raw: &'a [u8],
            ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
                let s = <&str as FromSql>::from_sql(ty, raw)?;
                let parse: fn(&str) -> Result<$ty, String> = $parse;
                parse(s).map_err(Into::into)
            }

            fn accepts(ty: &Type) -> bool {
                <&str as FromSql>::accepts(ty)
            }
        }
    };
}

text_sql!(PortalStatus, |s| PortalStatus::parse(s)
    .ok_or_else(|| format!("unknown portal status `{s}`")));
text_sql!(MemberId, |s| MemberId::parse(s).map_err(|e| e.to_string()));

/// A token as stored: sealed by the worker's key. Opaque here; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed(pub String);

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealed(***)")
    }
}

/// The SHA-256 of an application_token, as stored.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Does `given` hash to the stored digest? Constant time in the digest.
pub fn token_matches(stored_digest: &str, given: &Secret) -> bool {
    let digest = token_digest(given.expose());
    digest.as_bytes().ct_eq(stored_digest.as_bytes()).into()
}

/// A portal's row.
#[derive(Debug, Clone)]
pub struct Portal {
    pub member_id: MemberId,
    pub domain: String,
    pub client_endpoint: String,
    /// The portal's authorization server (`auth[server_endpoint]`), checked against the
    /// allowlist when it was stored.
    pub server_endpoint: Option<String>,
    pub access_token: Option<Sealed>,
    pub refresh_token: Option<Sealed>,
    pub expires_at: Option<DateTime<Utc>>,
    pub tokens_issued_at: Option<DateTime<Utc>>,
    pub application_token_sha256: Option<String>,
    pub status: PortalStatus,
    pub app_status: Option<String>,
    pub app_version: Option<String>,
    pub payment_expired: Option<bool>,
    pub days_left: Option<i32>,
    pub app_checked_at: Option<DateTime<Utc>>,
    pub gone_since: Option<DateTime<Utc>>,
    /// SHA-256 of the refresh token the last verified installation was proved with.
    pub proven_refresh_sha256: Option<String>,
    pub proven_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "member_id, domain, client_endpoint, server_endpoint, access_token, \
     refresh_token, expires_at, tokens_issued_at, application_token_sha256, status, app_status, \
     app_version, payment_expired, days_left, app_checked_at, gone_since, proven_refresh_sha256, \
     proven_at, updated_at";

impl Portal {
    fn from_row(r: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            member_id: r.try_get(0)?,
            domain: r.try_get(1)?,
            client_endpoint: r.try_get(2)?,
            server_endpoint: r.try_get(3)?,
            access_token: r.try_get::<_, Option<String>>(4)?.map(Sealed),
            refresh_token: r.try_get::<_, Option<String>>(5)?.map(Sealed),
            expires_at: r.try_get(6)?,
            tokens_issued_at: r.try_get(7)?,
            application_token_sha256: r.try_get(8)?,
            status: r.try_get(9)?,
            app_status: r.try_get(10)?,
            app_version: r.try_get(11)?,
            payment_expired: r.try_get(12)?,
            days_left: r.try_get(13)?,
            app_checked_at: r.try_get(14)?,
            gone_since: r.try_get(15)?,
            proven_refresh_sha256: r.try_get(16)?,
            proven_at: r.try_get(17)?,
            updated_at: r.try_get(18)?,
        })
    }

    /// Does this event's application_token prove it comes from Bitrix24 for this portal?
    pub fn application_token_matches(&self, given: &Secret) -> bool {
        self.application_token_sha256
            .as_deref()
            .is_some_and(|d| token_matches(d, given))
    }
}

pub type DbResult<T> = Result<T, tokio_postgres::Error>;

/// The row of `member_id`.
pub async fn find(db: &impl GenericClient, member_id: &MemberId) -> DbResult<Option<Portal>> {
    let sql = format!("SELECT {COLUMNS} FROM portals WHERE member_id = $1");
    db.query_opt(&sql, &[member_id])
        .await?
        .map(|r| Portal::from_row(&r))
        .transpose()
}

/// The row of `member_id`, locked until the transaction ends: token refreshes and
/// installations of one portal take turns, across replicas.
pub async fn lock(db: &impl GenericClient, member_id: &MemberId) -> DbResult<Option<Portal>> {
    let sql = format!("SELECT {COLUMNS} FROM portals WHERE member_id = $1 FOR UPDATE");
    db.query_opt(&sql, &[member_id])
        .await?
        .map(|r| Portal::from_row(&r))
        .transpose()
}

/// The live portal on `domain` (unique among live portals), for events that carry no
/// member_id (`ONAPPPAYMENT`).
pub async fn find_live_by_domain(
    db: &impl GenericClient,
    domain: &str,
) -> DbResult<Option<Portal>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM portals
          WHERE lower(domain) = lower($1) AND status NOT IN ('uninstalled', 'deleted')"
    );
    db.query_opt(&sql, &[&domain])
        .await?
        .map(|r| Portal::from_row(&r))
        .transpose()
}

/// What the ingress needs to check an event at the edge.
#[derive(Debug, Clone)]
pub struct EdgeView {
    pub application_token_sha256: Option<String>,
    pub status: PortalStatus,
}

pub async fn edge_view(db: &impl GenericClient, member_id: &str) -> DbResult<Option<EdgeView>> {
    let row = db
        .query_opt(
            "SELECT application_token_sha256, status FROM portals WHERE member_id = $1",
            &[&member_id],
        )
        .await?;
    row.map(|r| {
        Ok(EdgeView {
            application_token_sha256: r.try_get(0)?,
            status: r.try_get(1)?,
        })
    })
    .transpose()
}

/// A verified installation: what the authorization server and Bitrix24 vouched for.
#[derive(Debug, Clone)]
pub struct VerifiedInstall {
    pub member_id: MemberId,
    /// The host (and port, if any) of `client_endpoint`.
    pub domain: String,
    pub client_endpoint: String,
    pub server_endpoint: Option<String>,
    pub access_token: Sealed,
    pub refresh_token: Sealed,
    pub expires_in_secs: i64,
    /// Only from a verified `ONAPPINSTALL` or `ONAPPUPDATE`; `None` keeps the stored one.
    pub application_token: Option<Secret>,
    pub app_status: Option<String>,
    pub app_version: Option<String>,
    /// The refresh token the proof consumed, as [`token_digest`].
    pub proven_refresh_sha256: String,
}

/// Why a verified installation could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("domain `{0}` belongs to another installed portal")]
    DomainTaken(String),
    #[error("database: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// Creates or replaces the portal after a verified installation. A live portal's
/// domain stays unique: another member_id's claim to it is refused.
pub async fn install(db: &impl GenericClient, v: &VerifiedInstall) -> Result<(), InstallError> {
    let digest = v
        .application_token
        .as_ref()
        .map(|t| token_digest(t.expose()));
    let result = db
        .execute(
            "INSERT INTO portals (member_id, domain, client_endpoint, server_endpoint,
                                  access_token, refresh_token, expires_at, tokens_issued_at,
                                  application_token_sha256, status, app_status, app_version,
                                  gone_since, proven_refresh_sha256, proven_at)
             VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7), now(), $8,
                     'installed', $9, $10, NULL, $11, now())
             ON CONFLICT (member_id) DO UPDATE SET
                 domain = EXCLUDED.domain,
                 client_endpoint = EXCLUDED.client_endpoint,
                 server_endpoint = coalesce(EXCLUDED.server_endpoint, portals.server_endpoint),
                 access_token = EXCLUDED.access_token,
                 refresh_token = EXCLUDED.refresh_token,
                 expires_at = EXCLUDED.expires_at,
                 tokens_issued_at = now(),
                 application_token_sha256 =
                     coalesce(EXCLUDED.application_token_sha256, portals.application_token_sha256),
                 status = 'installed',
                 app_status = coalesce(EXCLUDED.app_status, portals.app_status),
                 app_version = coalesce(EXCLUDED.app_version, portals.app_version),
                 gone_since = NULL,
                 proven_refresh_sha256 = EXCLUDED.proven_refresh_sha256,
                 proven_at = now(),
                 -- A reinstall opens the ingress's grace window again (its events
                 -- may arrive before the worker stores the new application_token).
                 installed_at = CASE WHEN portals.status IN ('uninstalled', 'deleted')
                                       OR portals.application_token_sha256 IS NULL
                                     THEN now() ELSE portals.installed_at END,
                 updated_at = now()",
            &[
                &v.member_id,
                &v.domain,
                &v.client_endpoint,
                &v.server_endpoint,
                &v.access_token.0,
                &v.refresh_token.0,
                &(v.expires_in_secs as f64),
                &digest,
                &v.app_status,
                &v.app_version,
                &v.proven_refresh_sha256,
            ],
        )
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.code().is_some_and(|c| c.code() == "23505") => {
            Err(InstallError::DomainTaken(v.domain.clone()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Stores the application_token of a verified `ONAPPINSTALL`/`ONAPPUPDATE` whose
/// tokens were proved by an earlier step of the same installation.
pub async fn set_application_token(
    db: &impl GenericClient,
    member_id: &MemberId,
    token: &Secret,
) -> DbResult<()> {
    db.execute(
        "UPDATE portals SET application_token_sha256 = $2, updated_at = now()
          WHERE member_id = $1",
        &[member_id, &token_digest(token.expose())],
    )
    .await?;
    Ok(())
}

/// Replaces the pair after a refresh (the caller holds the row lock); `endpoint` and
/// `domain` as the authorization server reported them.
pub async fn store_tokens(
    db: &impl GenericClient,
    member_id: &MemberId,
    access: &Sealed,
    refresh: &Sealed,
    expires_in_secs: i64,
    moved: Option<(&str, &str)>,
) -> DbResult<()> {
    let (endpoint, domain) = moved.unzip();
    db.execute(
        "UPDATE portals SET access_token = $2, refresh_token = $3,
                expires_at = now() + make_interval(secs => $4), tokens_issued_at = now(),
                client_endpoint = coalesce($5, client_endpoint),
                domain = coalesce($6, domain), updated_at = now()
          WHERE member_id = $1",
        &[
            member_id,
            &access.0,
            &refresh.0,
            &(expires_in_secs as f64),
            &endpoint,
            &domain,
        ],
    )
    .await?;
    Ok(())
}

/// Re-seals a row's tokens under the current key (key rotation, clear-text rows).
pub async fn reseal(
    db: &impl GenericClient,
    member_id: &MemberId,
    access: Option<&Sealed>,
    refresh: Option<&Sealed>,
) -> DbResult<()> {
    db.execute(
        "UPDATE portals SET access_token = $2, refresh_token = $3 WHERE member_id = $1",
        &[member_id, &access.map(|s| &s.0), &refresh.map(|s| &s.0)],
    )
    .await?;
    Ok(())
}

/// Every portal that holds tokens, for re-sealing.
pub async fn with_tokens(db: &impl GenericClient) -> DbResult<Vec<Portal>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM portals WHERE access_token IS NOT NULL OR refresh_token IS NOT NULL"
    );
    db.query(&sql, &[])
        .await?
        .iter()
        .map(Portal::from_row)
        .collect()
}

/// The portal answered from a new address (a followed redirect): it keeps its
/// member_id; endpoint and domain follow. Refused (false) when another live portal
/// holds that domain.
pub async fn moved(
    db: &impl GenericClient,
    member_id: &MemberId,
    endpoint: &str,
    domain: &str,
) -> DbResult<bool> {
    match db
        .execute(
            "UPDATE portals SET client_endpoint = $2, domain = $3, updated_at = now()
              WHERE member_id = $1",
            &[member_id, &endpoint, &domain],
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.code().is_some_and(|c| c.code() == "23505") => Ok(false),
        Err(e) => Err(e),
    }
}

pub async fn set_status(
    db: &impl GenericClient,
    member_id: &MemberId,
    status: PortalStatus,
) -> DbResult<()> {
    db.execute(
        "UPDATE portals SET status = $2, updated_at = now() WHERE member_id = $1",
        &[member_id, &status],
    )
    .await?;
    Ok(())
}

/// Records a `PORTAL_DELETED` answer; returns for how long they have been coming.
pub async fn note_gone(
    db: &impl GenericClient,
    member_id: &MemberId,
) -> DbResult<std::time::Duration> {
    let row = db
        .query_one(
            "UPDATE portals SET gone_since = coalesce(gone_since, now()), updated_at = now()
              WHERE member_id = $1
             RETURNING extract(epoch FROM now() - gone_since)::float8",
            &[member_id],
        )
        .await?;
    let secs: f64 = row.try_get(0)?;
    Ok(std::time::Duration::from_secs_f64(secs.max(0.0)))
}

/// A call went through: the portal is not gone.
pub async fn clear_gone(db: &impl GenericClient, member_id: &MemberId) -> DbResult<()> {
    db.execute(
        "UPDATE portals SET gone_since = NULL WHERE member_id = $1 AND gone_since IS NOT NULL",
        &[member_id],
    )
    .await?;
    Ok(())
}

/// The app's state from `app.info`; a paid app lifts `payment_required`.
pub async fn store_app_state(
    db: &impl GenericClient,
    member_id: &MemberId,
    app_status: &str,
    payment_expired: bool,
    days_left: Option<i32>,
    version: Option<&str>,
) -> DbResult<()> {
    db.execute(
        "UPDATE portals SET app_status = $2, payment_expired = $3, days_left = $4,
                app_version = coalesce($5, app_version), app_checked_at = now(),
                status = CASE WHEN status = 'payment_required' AND NOT $3
                              THEN 'installed' ELSE status END,
                updated_at = now()
          WHERE member_id = $1",
        &[
            member_id,
            &app_status,
            &payment_expired,
            &days_left,
            &version,
        ],
    )
    .await?;
    Ok(())
}

/// Claims the right to call `app.info` for an unauthenticated payment event: true for
/// at most one caller per portal per `debounce`.
pub async fn claim_app_check(
    db: &impl GenericClient,
    member_id: &MemberId,
    debounce: std::time::Duration,
) -> DbResult<bool> {
    let n = db
        .execute(
            "UPDATE portals SET app_checked_at = now()
              WHERE member_id = $1
                AND (app_checked_at IS NULL
                     OR app_checked_at < now() - make_interval(secs => $2))",
            &[member_id, &debounce.as_secs_f64()],
        )
        .await?;
    Ok(n == 1)
}

/// `ONAPPUNINSTALL`: the portal is uninstalled and its tokens erased; with `clean`
/// (`CLEAN=1`) its stored entities go too. An audit row remembers either.
pub async fn uninstall(
    db: &mut deadpool_postgres::Client,
    member_id: &MemberId,
    clean: bool,
) -> DbResult<u64> {
    let tx = db.transaction().await?;
    tx.execute(
        "UPDATE portals SET status = 'uninstalled', access_token = NULL, refresh_token = NULL,
                expires_at = NULL, application_token_sha256 = NULL, updated_at = now()
          WHERE member_id = $1",
        &[member_id],
    )
    .await?;
    let erased = if clean {
        tx.execute("DELETE FROM entities WHERE member_id = $1", &[member_id])
            .await?
    } else {
        0
    };
    audit(
        &tx,
        member_id,
        if clean {
            "uninstalled_clean"
        } else {
            "uninstalled"
        },
        serde_json::json!({ "entities_deleted": erased }),
    )
    .await?;
    tx.commit().await?;
    Ok(erased)
}

/// A portal whose upkeep is due, claimed by one replica until `release_upkeep`.
#[derive(Debug, Clone)]
pub struct Upkeep {
    pub member_id: MemberId,
    pub status: PortalStatus,
    /// Offline events are due to be collected.
    pub poll_due: bool,
    /// The pending `process_id` of an unfinished pass.
    pub process_id: Option<String>,
    /// The stored pair is older than the idle-refresh age.
    pub refresh_due: bool,
    /// Held for payment, and `app.info` was not asked lately.
    pub payment_check_due: bool,
}

/// What is due, and how often.
#[derive(Debug, Clone, Copy)]
pub struct UpkeepPolicy {
    /// `None`: offline events are not collected.
    pub poll_every: Option<std::time::Duration>,
    pub refresh_after: std::time::Duration,
    pub payment_check_every: std::time::Duration,
    /// How long a claim lasts if the replica dies holding it.
    pub lease: std::time::Duration,
}

/// Claims up to `limit` portals with upkeep due for `owner`: one replica per portal at a
/// time (the lease), the longest-waiting first.
pub async fn claim_upkeep(
    db: &impl GenericClient,
    owner: &str,
    policy: &UpkeepPolicy,
    limit: i64,
) -> DbResult<Vec<Upkeep>> {
    let poll = policy.poll_every.map(|d| d.as_secs_f64());
    let rows = db
        .query(
            "WITH due AS (
                 SELECT member_id,
                        (status = 'installed' AND $3::float8 IS NOT NULL
                         AND (reconciled_at IS NULL
                              OR reconciled_at < now() - make_interval(secs => $3::float8)))
                            AS poll_due,
                        (status = 'installed' AND refresh_token IS NOT NULL
                         AND coalesce(tokens_issued_at, updated_at)
                             < now() - make_interval(secs => $4::float8)) AS refresh_due,
                        (status = 'payment_required'
                         AND (app_checked_at IS NULL
                              OR app_checked_at < now() - make_interval(secs => $5::float8)))
                            AS payment_check_due
                   FROM portals
                  WHERE reconcile_until IS NULL OR reconcile_until < now()
             ), picked AS (
                 SELECT p.member_id, d.poll_due, d.refresh_due, d.payment_check_due
                   FROM portals p JOIN due d USING (member_id)
                  WHERE d.poll_due OR d.refresh_due OR d.payment_check_due
                  ORDER BY p.reconciled_at NULLS FIRST
                  LIMIT $6
                  FOR UPDATE OF p SKIP LOCKED
             )
             UPDATE portals p
                SET reconcile_owner = $1,
                    reconcile_until = now() + make_interval(secs => $2::float8)
               FROM picked
              WHERE p.member_id = picked.member_id
             RETURNING p.member_id, p.status, picked.poll_due, p.reconcile_process_id,
                       picked.refresh_due, picked.payment_check_due",
            &[
                &owner,
                &policy.lease.as_secs_f64(),
                &poll,
                &policy.refresh_after.as_secs_f64(),
                &policy.payment_check_every.as_secs_f64(),
                &limit,
            ],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Upkeep {
                member_id: r.try_get(0)?,
                status: r.try_get(1)?,
                poll_due: r.try_get(2)?,
                process_id: r.try_get(3)?,
                refresh_due: r.try_get(4)?,
                payment_check_due: r.try_get(5)?,
            })
        })
        .collect()
}

/// Remembers (or, with `None`, forgets) the `process_id` of a pass in progress.
pub async fn set_pending_process(
    db: &impl GenericClient,
    member_id: &MemberId,
    process_id: Option<&str>,
) -> DbResult<()> {
    db.execute(
        "UPDATE portals SET reconcile_process_id = $2 WHERE member_id = $1",
        &[member_id, &process_id],
    )
    .await?;
    Ok(())
}

/// Ends `owner`'s claim; `polled` records a finished offline pass.
pub async fn release_upkeep(
    db: &impl GenericClient,
    member_id: &MemberId,
    owner: &str,
    polled: bool,
) -> DbResult<()> {
    db.execute(
        "UPDATE portals SET reconcile_owner = NULL, reconcile_until = NULL,
                reconciled_at = CASE WHEN $3 THEN now() ELSE reconciled_at END
          WHERE member_id = $1 AND reconcile_owner = $2",
        &[member_id, &owner, &polled],
    )
    .await?;
    Ok(())
}

/// A refresh made for an installation's proof, kept until the installation is stored.
#[derive(Debug, Clone)]
pub struct Proof {
    pub member_id: MemberId,
    pub client_endpoint: Option<String>,
    pub server_endpoint: Option<String>,
    pub access_token: Sealed,
    pub refresh_token: Sealed,
    pub expires_in: i32,
    pub app_status: Option<String>,
}

/// The proof made with the offered refresh token (its digest), if one was made in the
/// last day.
pub async fn find_proof(db: &impl GenericClient, offered_digest: &str) -> DbResult<Option<Proof>> {
    let row = db
        .query_opt(
            "SELECT member_id, client_endpoint, server_endpoint, access_token, refresh_token,
                    expires_in, app_status
               FROM install_proofs
              WHERE offered_refresh_sha256 = $1 AND created_at > now() - interval '1 day'",
            &[&offered_digest],
        )
        .await?;
    row.map(|r| {
        Ok(Proof {
            member_id: r.try_get(0)?,
            client_endpoint: r.try_get(1)?,
            server_endpoint: r.try_get(2)?,
            access_token: Sealed(r.try_get(3)?),
            refresh_token: Sealed(r.try_get(4)?),
            expires_in: r.try_get(5)?,
            app_status: r.try_get(6)?,
        })
    })
    .transpose()
}

/// Keeps a proof's refreshed pair (and forgets proofs older than a day).
pub async fn keep_proof(db: &impl GenericClient, offered_digest: &str, p: &Proof) -> DbResult<()> {
    db.execute(
        "DELETE FROM install_proofs WHERE created_at < now() - interval '1 day'",
        &[],
    )
    .await?;
    db.execute(
        "INSERT INTO install_proofs (offered_refresh_sha256, member_id, client_endpoint,
                                     server_endpoint, access_token, refresh_token,
                                     expires_in, app_status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (offered_refresh_sha256) DO NOTHING",
        &[
            &offered_digest,
            &p.member_id,
            &p.client_endpoint,
            &p.server_endpoint,
            &p.access_token.0,
            &p.refresh_token.0,
            &p.expires_in,
            &p.app_status,
        ],
    )
    .await?;
    Ok(())
}

pub async fn forget_proof(db: &impl GenericClient, offered_digest: &str) -> DbResult<()> {
    db.execute(
        "DELETE FROM install_proofs WHERE offered_refresh_sha256 = $1",
        &[&offered_digest],
    )
    .await?;
    Ok(())
}

/// Appends to the portal's audit trail (installs, reinstalls, token changes,
/// uninstalls). `detail` never holds a token.
pub async fn audit(
    db: &impl GenericClient,
    member_id: &MemberId,
    action: &str,
    detail: serde_json::Value,
) -> DbResult<()> {
    db.execute(
        "INSERT INTO portal_audit (member_id, action, detail) VALUES ($1, $2, $3)",
        &[member_id, &action, &detail],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_their_names() {
        for s in PortalStatus::ALL {
            assert_eq!(PortalStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(PortalStatus::parse("installing"), None);
    }

    #[test]
    fn application_tokens_are_compared_by_digest() {
        let digest = token_digest("51856fefc120afa4b628cc82d3935cce");
        assert_eq!(digest.len(), 64);
        assert!(token_matches(
            &digest,
            &Secret::new("51856fefc120afa4b628cc82d3935cce")
        ));
        assert!(!token_matches(
            &digest,
            &Secret::new("51856fefc120afa4b628cc82d3935ccf")
        ));
        assert!(!token_matches(&digest, &Secret::new("")));
    }
}
