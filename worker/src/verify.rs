//! What a message may do, decided before anything is stored or called. The envelope is
//! parsed once into a typed [`Message`], then checked against the stored portal:
//! unknown portals and forged tokens never reach Bitrix24, a database row, or the
//! dead-letter queue — they are counted and dropped ([`Failure::Drop`]).
//!
//! Who may do what (DESIGN.md's trust model):
//! - an installation (install page, `ONAPPINSTALL`, an update with a new token) is
//!   proved by its handler ([`crate::handlers::install`]); here it is only shaped;
//! - `ONAPPUPDATE` with the stored application_token rebinds; with another one it must
//!   carry tokens that prove themselves;
//! - every other event must carry the stored application_token, but `ONAPPPAYMENT`,
//!   which Bitrix24 sends without one and which is then only a debounced hint;
//! - a widget call is served with its own `AUTH_ID` only;
//! - an offline record was fetched by our reconciler with the stored tokens.

use crate::handlers::install::{Claim, Source};
use crate::handlers::{self, Failure, Plan, Work};
use b24_shared::event::{
    InboundError, InboundEvent, InstallCall, KnownEvent, MemberId, PlacementCall,
};
use b24_shared::portals::{self, Portal};
use b24_shared::{Envelope, EnvelopeKind};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::Value;
use std::time::Duration;

/// A message, parsed once from its envelope.
#[derive(Debug)]
pub enum Message {
    Event {
        event: InboundEvent,
        known: Option<KnownEvent>,
    },
    Placement(PlacementCall),
    Install(InstallCall),
    Offline(OfflineRecord),
}

/// A record of Bitrix24's offline-event queue, as the reconciler published it.
#[derive(Debug, Clone)]
pub struct OfflineRecord {
    pub member_id: MemberId,
    pub event: String,
    pub known: Option<KnownEvent>,
    pub data: Value,
    /// `TIMESTAMP_X`: when the change was (last) recorded.
    pub timestamp: Option<DateTime<Utc>>,
}

impl Message {
    pub fn parse(env: &Envelope) -> Result<Self, InboundError> {
        Ok(match env.kind {
            EnvelopeKind::Event => {
                let event = InboundEvent::parse(&env.payload)?;
                let known = KnownEvent::from_code(event.event.as_str());
                Self::Event { event, known }
            }
            EnvelopeKind::Placement => Self::Placement(PlacementCall::parse(&env.payload)?),
            EnvelopeKind::Install => Self::Install(InstallCall::parse(&env.payload)?),
            EnvelopeKind::Offline => {
                let member_id = env
                    .member_id
                    .clone()
                    .ok_or(InboundError::Missing("member_id"))?;
                let p = &env.payload;
                let event = p
                    .get("EVENT_NAME")
                    .and_then(Value::as_str)
                    .ok_or(InboundError::Missing("EVENT_NAME"))?
                    .to_ascii_uppercase();
                let timestamp = p
                    .get("TIMESTAMP_X")
                    .and_then(Value::as_str)
                    .and_then(parse_timestamp);
                Self::Offline(OfflineRecord {
                    member_id,
                    known: KnownEvent::from_code(&event),
                    event,
                    data: p.get("EVENT_DATA").cloned().unwrap_or(Value::Null),
                    timestamp,
                })
            }
        })
    }

    /// The bounded label of its metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Event { known: Some(k), .. } => k.label(),
            Self::Event { known: None, .. } => "other_event",
            Self::Placement(p) => {
                b24_shared::event::KnownPlacement::from_code(p.placement.as_str())
                    .map_or("other_placement", |k| k.label())
            }
            Self::Install(_) => "install",
            Self::Offline(r) => r.known.map_or("other_offline", |k| k.label()),
        }
    }
}

/// `TIMESTAMP_X` as Bitrix24 writes it: ISO 8601 with an offset, or the database's
/// `YYYY-MM-DD HH:MM:SS` (taken as UTC).
pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Some(t.with_timezone(&Utc));
    }
    chrono::NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%d %H:%M:%S")
        .ok()
        .map(|t| t.and_utc())
}

/// What verification needs from the configuration.
pub struct Rules {
    /// How long events wait for an application_token still on its way.
    pub token_pending_max: Duration,
}

/// How long an event waits before looking again for its portal's application_token.
const TOKEN_PENDING_RETRY: Duration = Duration::from_secs(5);

/// The verified work and the portal it concerns.
pub struct Verified {
    pub member_id: Option<MemberId>,
    pub work: Work,
}

pub async fn verify(
    db: &impl GenericClient,
    rules: &Rules,
    env: &Envelope,
    msg: &Message,
) -> Result<Verified, Failure> {
    match msg {
        Message::Install(call) => {
            let scheme = if call.protocol.as_deref() == Some("0") {
                "http"
            } else {
                "https"
            };
            let claim = Claim {
                source: Source::Page,
                member_id: call.member_id.clone(),
                domain: call.domain.clone(),
                client_endpoint: format!("{scheme}://{}/rest/", call.domain),
                server_endpoint: call.server_endpoint.clone(),
                refresh_token: Some(call.refresh_id.clone()),
                // Never from the page: only a proved ONAPPINSTALL brings it.
                application_token: None,
                version: None,
            };
            Ok(Verified {
                member_id: Some(call.member_id.clone()),
                work: Work::Install(claim),
            })
        }
        Message::Event { event, known } => verify_event(db, rules, env, event, *known).await,
        Message::Placement(call) => {
            let portal = portals::find(db, &call.member_id)
                .await?
                .filter(|p| p.status.is_live())
                .ok_or_else(|| {
                    Failure::drop("UNKNOWN_PORTAL", "no installed portal for this call")
                })?;
            Ok(Verified {
                member_id: Some(portal.member_id.clone()),
                work: handlers::placement::work(&portal, call)?,
            })
        }
        Message::Offline(record) => {
            let portal = portals::find(db, &record.member_id)
                .await?
                .filter(|p| p.status.is_live())
                .ok_or_else(|| {
                    Failure::drop(
                        "UNKNOWN_PORTAL",
                        "offline record of a portal no longer installed",
                    )
                })?;
            let work = match record.known {
                Some(k) => match fetches(k, &record.data)? {
                    Some(fetches) => Work::Fetch(Plan {
                        unless_fetched_after: record.timestamp,
                        ..Plan::stored(&portal.member_id, fetches)
                    }),
                    None => Work::Ignore,
                },
                None => Work::Ignore,
            };
            Ok(Verified {
                member_id: Some(portal.member_id),
                work,
            })
        }
    }
}

/// The fetches of a data event, `None` for events that fetch nothing.
fn fetches(known: KnownEvent, data: &Value) -> Result<Option<Vec<handlers::Fetch>>, Failure> {
    Ok(match known {
        KnownEvent::DealRecurringExpose => Some(handlers::deal_recurring::fetches(data)?),
        KnownEvent::RequisiteAdd => Some(handlers::requisite::fetches(data)?),
        KnownEvent::AppInstall
        | KnownEvent::AppUpdate
        | KnownEvent::AppUninstall
        | KnownEvent::AppPayment => None,
    })
}

async fn verify_event(
    db: &impl GenericClient,
    rules: &Rules,
    env: &Envelope,
    event: &InboundEvent,
    known: Option<KnownEvent>,
) -> Result<Verified, Failure> {
    let auth = &event.auth;
    if known == Some(KnownEvent::AppInstall) {
        let member_id = auth.member_id.clone().ok_or_else(|| {
            Failure::dead("MALFORMED_PAYLOAD", "ONAPPINSTALL without auth[member_id]")
        })?;
        let claim = claim_from_event(event, member_id.clone(), Source::InstallEvent)?;
        return Ok(Verified {
            member_id: Some(member_id),
            work: Work::Install(claim),
        });
    }
    let portal = find_portal(db, event, known).await?;
    let member_id = portal.member_id.clone();
    let verified = |work| {
        Ok(Verified {
            member_id: Some(member_id.clone()),
            work,
        })
    };
    let genuine = match (&auth.application_token, &portal.application_token_sha256) {
        (Some(given), Some(_)) if portal.application_token_matches(given) => true,
        (Some(_), Some(_)) => {
            if known == Some(KnownEvent::AppUpdate) && auth.refresh_token.is_some() {
                // A new version may bring a new token: accepted only through the proof.
                let claim = claim_from_event(event, member_id.clone(), Source::UpdateEvent)?;
                return verified(Work::Install(claim));
            }
            return Err(Failure::drop(
                "APPLICATION_TOKEN_MISMATCH",
                "application_token does not match the portal's",
            ));
        }
        (Some(_), None) if portal.status.is_live() => {
            // Installed from the install page, ONAPPINSTALL not processed yet.
            let age = Utc::now()
                .signed_duration_since(env.received_at)
                .to_std()
                .unwrap_or_default();
            if age > rules.token_pending_max {
                return Err(Failure::dead(
                    "APPLICATION_TOKEN_UNKNOWN",
                    "the portal's application_token never arrived (ONAPPINSTALL missing); replay once it is installed",
                ));
            }
            return Err(Failure::hold(
                "APPLICATION_TOKEN_PENDING",
                "the portal's application_token has not arrived yet",
                TOKEN_PENDING_RETRY,
            ));
        }
        (Some(_), None) => {
            return Err(Failure::drop(
                "APPLICATION_TOKEN_UNKNOWN",
                "portal has no application_token to verify against",
            ))
        }
        (None, _) => false,
    };
    if !genuine && !known.is_some_and(KnownEvent::unauthenticated) {
        return Err(Failure::drop(
            "APPLICATION_TOKEN_MISSING",
            "event has no auth[application_token]",
        ));
    }
    if known == Some(KnownEvent::AppUninstall) {
        let clean = matches!(
            event.data.get("CLEAN").and_then(|c| match c {
                Value::String(s) => Some(s.as_str() == "1" || s.eq_ignore_ascii_case("Y")),
                Value::Number(n) => Some(n.as_i64() == Some(1)),
                Value::Bool(b) => Some(*b),
                _ => None,
            }),
            Some(true)
        );
        return verified(Work::Uninstall {
            member_id: member_id.clone(),
            clean,
        });
    }
    if !portal.status.is_live() {
        return Err(Failure::drop(
            "NOT_INSTALLED",
            format!("portal is {}", portal.status),
        ));
    }
    match known {
        Some(KnownEvent::AppUpdate) => verified(Work::Rebind {
            member_id: member_id.clone(),
            version: event
                .data
                .get("VERSION")
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)),
        }),
        Some(KnownEvent::AppPayment) => verified(Work::Payment {
            member_id: member_id.clone(),
            authenticated: genuine,
        }),
        Some(k) => match fetches(k, &event.data)? {
            Some(f) => verified(Work::Fetch(Plan::stored(&member_id, f))),
            None => verified(Work::Ignore),
        },
        None => verified(Work::Ignore),
    }
}

/// The portal an event names: by member_id, or by domain for events documented without
/// one (`ONAPPPAYMENT`); the domain is unique among live portals.
async fn find_portal(
    db: &impl GenericClient,
    event: &InboundEvent,
    known: Option<KnownEvent>,
) -> Result<Portal, Failure> {
    let auth = &event.auth;
    let portal = match (&auth.member_id, &auth.domain) {
        (Some(m), _) => portals::find(db, m).await?,
        (None, Some(d)) if known.is_some_and(KnownEvent::identified_by_domain) => {
            portals::find_live_by_domain(db, d).await?
        }
        _ => None,
    };
    portal.ok_or_else(|| Failure::drop("UNKNOWN_PORTAL", "no installed portal for this event"))
}

fn claim_from_event(
    event: &InboundEvent,
    member_id: MemberId,
    source: Source,
) -> Result<Claim, Failure> {
    let a = &event.auth;
    let missing = |what: &str| {
        Failure::dead(
            "MALFORMED_PAYLOAD",
            format!("{} without {what}", event.event.as_str()),
        )
    };
    Ok(Claim {
        source,
        member_id,
        domain: a.domain.clone().ok_or_else(|| missing("auth[domain]"))?,
        client_endpoint: a
            .client_endpoint
            .clone()
            .ok_or_else(|| missing("auth[client_endpoint]"))?,
        server_endpoint: a.server_endpoint.clone(),
        refresh_token: a.refresh_token.clone(),
        application_token: Some(
            a.application_token
                .clone()
                .ok_or_else(|| missing("auth[application_token]"))?,
        ),
        version: event
            .data
            .get("VERSION")
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_timestamps_parse_in_both_documented_shapes() {
        let t = parse_timestamp("2025-03-04T12:00:00+03:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2025-03-04T09:00:00+00:00");
        let t = parse_timestamp("2025-03-04 12:00:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2025-03-04T12:00:00+00:00");
        assert!(parse_timestamp("yesterday").is_none());
    }
}
