//! One module per event family. A handler turns a verified message into `Work`: most
//! become a `Plan` (the REST calls to make and where each result is stored), which the
//! consumer runs alone or merged with other events of the same portal into a `batch`.
//! Installation and uninstallation change the portal itself and run directly.

pub mod deal_recurring;
pub mod install;
pub mod payment;
pub mod placement;
pub mod requisite;
pub mod uninstall;

use crate::bitrix::{B24Error, ErrorClass};
use crate::store::{EntityWrite, PaymentState};
use b24_shared::Secret;
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
            Some(key) => result.get(key).cloned().ok_or_else(|| Failure::Dead {
                code: "UNEXPECTED_RESULT".into(),
                reason: format!("{} result has no `{key}`", self.method),
            })?,
            None => result.clone(),
        };
        if !data.is_object() {
            return Err(Failure::Dead {
                code: "UNEXPECTED_RESULT".into(),
                reason: format!("{} result is not an object", self.method),
            });
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
    /// The portal's stored tokens.
    Stored,
    /// A widget user's own token first; the stored tokens if Bitrix24 refuses it.
    UserThenStored(Secret),
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub member_id: String,
    pub auth: PlanAuth,
    pub fetches: Vec<Fetch>,
    /// `ONAPPPAYMENT`: the app's status from `app.info` also goes on the portal row.
    pub payment: bool,
}

impl Plan {
    pub fn stored(member_id: &str, fetches: Vec<Fetch>) -> Self {
        Self {
            member_id: member_id.to_string(),
            auth: PlanAuth::Stored,
            fetches,
            payment: false,
        }
    }
}

/// What to do with a message.
#[derive(Debug)]
pub enum Work {
    Plan(Plan),
    Install(crate::store::Installation),
    Uninstall {
        member_id: String,
    },
    /// An event we do not handle: recorded, counted, acked.
    Ignore,
}

/// Why a message was not completed, and so how it is settled.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Try again later through the delay queues.
    Retry {
        code: String,
        reason: String,
        after: Option<Duration>,
    },
    /// Never retried: the dead-letter queue, with this code and reason.
    Dead { code: String, reason: String },
}

impl Failure {
    pub fn dead(code: &str, reason: impl Into<String>) -> Self {
        Self::Dead {
            code: code.into(),
            reason: reason.into(),
        }
    }

    pub fn code(&self) -> &str {
        match self {
            Self::Retry { code, .. } | Self::Dead { code, .. } => code,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Self::Retry { reason, .. } | Self::Dead { reason, .. } => reason,
        }
    }
}

impl From<B24Error> for Failure {
    fn from(e: B24Error) -> Self {
        let reason = e.to_string();
        let code = e.code.clone();
        if e.class.is_retryable() {
            Self::Retry {
                code,
                reason,
                after: e.retry_after,
            }
        } else {
            // Permanent, portal gone, refresh refused, or not something a retry fixes.
            debug_assert!(e.class != ErrorClass::Transient);
            Self::Dead { code, reason }
        }
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Retry {
            code: "DATABASE".into(),
            reason: e.to_string(),
            after: None,
        }
    }
}

/// Builds the payment state from `app.info`'s answer (Bitrix24's word, not the
/// event's: ONAPPPAYMENT carries no token, so its data is not trusted for this).
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
    Some(PaymentState {
        app_status: status,
        payment_expired: expired,
        days_left: days.and_then(|d| i32::try_from(d).ok()),
    })
}
