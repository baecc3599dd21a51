//! One module per event family. Verification ([`crate::verify`]) turns a message into
//! [`Work`]; most becomes a [`Plan`] (the REST calls to make and where each result is
//! stored), which the consumer runs alone or merged with other events of the same
//! portal into a `batch`. Installation, update, uninstallation and payment change the
//! portal itself and run directly.
//!
//! Every way a message can end is here, once: [`Done`] for what is acked as finished,
//! [`Failure`] for what is retried, held, dead-lettered or dropped.

pub mod deal_recurring;
pub mod install;
pub mod payment;
pub mod placement;
pub mod requisite;
pub mod uninstall;

use crate::bitrix::{B24Error, ErrorClass};
use crate::store::EntityWrite;
use b24_shared::event::MemberId;
use b24_shared::Secret;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::time::Duration;

/// One REST call of a plan and the entity row its result becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetch {
    pub method: &'static str,
    pub params: Value,
    pub kind: String,
    pub entity_id: String,
    /// The part of `result` that is the entity (`crm.item.get` wraps it in `item`).
    pub pick: Option<&'static str>,
}

impl Fetch {
    pub fn entity(&self, result: &Value) -> Result<EntityWrite, Failure> {
        let data = match self.pick {
            Some(key) => result.get(key).cloned().ok_or_else(|| {
                Failure::dead(
                    "UNEXPECTED_RESULT",
                    format!("{} result has no `{key}`", self.method),
                )
            })?,
            None => result.clone(),
        };
        if !data.is_object() {
            return Err(Failure::dead(
                "UNEXPECTED_RESULT",
                format!("{} result is not an object", self.method),
            ));
        }
        Ok(EntityWrite {
            kind: self.kind.clone(),
            entity_id: self.entity_id.clone(),
            data,
        })
    }
}

/// Which token a plan's calls use.
#[derive(Debug, Clone)]
pub enum PlanAuth {
    /// The portal's stored tokens (batched with the portal's other events).
    Stored,
    /// A widget user's own `AUTH_ID` against the stored portal's endpoint, and nothing
    /// else: a widget call proves no more than its user's token does.
    User { endpoint: String, token: Secret },
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub member_id: MemberId,
    pub auth: PlanAuth,
    pub fetches: Vec<Fetch>,
    /// An offline record's `TIMESTAMP_X`: when every entity was fetched after it (the
    /// online path got there first), nothing is fetched again.
    pub unless_fetched_after: Option<DateTime<Utc>>,
}

impl Plan {
    pub fn stored(member_id: &MemberId, fetches: Vec<Fetch>) -> Self {
        Self {
            member_id: member_id.clone(),
            auth: PlanAuth::Stored,
            fetches,
            unless_fetched_after: None,
        }
    }
}

/// What a verified message asks for.
#[derive(Debug)]
pub enum Work {
    /// Fetch entities and store them.
    Fetch(Plan),
    /// A (re)installation, to be proved before anything is stored.
    Install(install::Claim),
    /// `ONAPPUPDATE` with the portal's own application_token: bind everything again.
    Rebind {
        member_id: MemberId,
        version: Option<String>,
    },
    Uninstall {
        member_id: MemberId,
        clean: bool,
    },
    /// `ONAPPPAYMENT`: ask `app.info`; unauthenticated ones are debounced.
    Payment {
        member_id: MemberId,
        authenticated: bool,
    },
    /// An event we do not handle: recorded, counted, acked.
    Ignore,
}

/// How a message finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Stored,
    Duplicate,
    Ignored,
    /// An unauthenticated `ONAPPPAYMENT` within the debounce window: no call made.
    Debounced,
    /// A widget call whose user's token Bitrix24 refused (`ACCESS_DENIED`, expired…):
    /// recorded with the code, not retried.
    Denied {
        code: String,
        reason: String,
    },
}

/// Why a message was not completed, and so how it is settled.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Try again later through the delay queues, spending an attempt.
    Retry {
        code: String,
        reason: String,
        after: Option<Duration>,
    },
    /// The portal cannot be called now (unpaid, needs a reinstall, closed, its budget
    /// saturated, its application_token still on the way): wait in a delay queue
    /// without spending an attempt.
    Hold {
        code: String,
        reason: String,
        after: Duration,
    },
    /// Never retried: the dead-letter queue, with this code and reason.
    Dead { code: String, reason: String },
    /// Failed verification (unknown portal, forged token): counted and dropped, never
    /// stored nor dead-lettered, so forged traffic cannot fill either.
    Drop { code: String, reason: String },
}

impl Failure {
    pub fn dead(code: &str, reason: impl Into<String>) -> Self {
        Self::Dead {
            code: code.into(),
            reason: reason.into(),
        }
    }

    pub fn drop(code: &str, reason: impl Into<String>) -> Self {
        Self::Drop {
            code: code.into(),
            reason: reason.into(),
        }
    }

    pub fn hold(code: &str, reason: impl Into<String>, after: Duration) -> Self {
        Self::Hold {
            code: code.into(),
            reason: reason.into(),
            after,
        }
    }

    pub fn retry(code: &str, reason: impl Into<String>) -> Self {
        Self::Retry {
            code: code.into(),
            reason: reason.into(),
            after: None,
        }
    }

    pub fn code(&self) -> &str {
        match self {
            Self::Retry { code, .. }
            | Self::Hold { code, .. }
            | Self::Dead { code, .. }
            | Self::Drop { code, .. } => code,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Self::Retry { reason, .. }
            | Self::Hold { reason, .. }
            | Self::Dead { reason, .. }
            | Self::Drop { reason, .. } => reason,
        }
    }
}

impl From<B24Error> for Failure {
    fn from(e: B24Error) -> Self {
        let reason = e.to_string();
        let code = e.code.clone();
        match e.class {
            ErrorClass::Held | ErrorClass::PaymentRequired => Self::Hold {
                code,
                reason,
                after: e.retry_after.unwrap_or(crate::bitrix::session::HOLD),
            },
            c if c.is_retryable() => Self::Retry {
                code,
                reason,
                after: e.retry_after,
            },
            // Permanent, portal gone for good, or not something a retry fixes.
            _ => Self::Dead { code, reason },
        }
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Self {
        Self::retry("DATABASE", e.to_string())
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::retry("DATABASE", b24_shared::db::describe(&e))
    }
}

impl From<b24_shared::db::PoolError> for Failure {
    fn from(e: b24_shared::db::PoolError) -> Self {
        Self::retry("DATABASE", format!("database pool: {e}"))
    }
}

/// The app's payment state from `app.info`'s answer (Bitrix24's word, not the event's:
/// `ONAPPPAYMENT` carries no token, so its data is not trusted for this).
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentState {
    pub app_status: String,
    pub payment_expired: bool,
    pub days_left: Option<i32>,
    pub version: Option<String>,
}

impl PaymentState {
    /// Stores it on the portal's row; a paid application lifts `payment_required`.
    pub async fn store(
        &self,
        db: &impl deadpool_postgres::GenericClient,
        member_id: &MemberId,
    ) -> Result<(), tokio_postgres::Error> {
        b24_shared::portals::store_app_state(
            db,
            member_id,
            &self.app_status,
            self.payment_expired,
            self.days_left,
            self.version.as_deref(),
        )
        .await
    }
}

pub fn payment_state(app_info: &Value) -> Option<PaymentState> {
    let status = app_info.get("STATUS")?.as_str()?.to_string();
    let expired = matches!(
        app_info.get("PAYMENT_EXPIRED").and_then(Value::as_str),
        Some("Y")
    );
    let days = app_info.get("DAYS").and_then(|d| match d {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    });
    let version = app_info.get("VERSION").and_then(|v| match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    });
    Some(PaymentState {
        app_status: status,
        payment_expired: expired,
        days_left: days.and_then(|d| i32::try_from(d).ok()),
        version,
    })
}
