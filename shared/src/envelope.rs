//! The one message type that crosses the broker. The ingress wraps every accepted call
//! in an `Envelope`; the worker re-parses `payload` with the same typed parsers
//! ([`crate::event`]), so what the ingress accepted the worker can always read.
//! `payload` still carries the call's tokens: never log it whole.

use crate::event::MemberId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvelopeKind {
    /// An outbound event POSTed to `/events` (`ONCRMDEALRECURRINGEXPOSE`, `ONAPPINSTALL`…).
    Event,
    /// A widget call POSTed to `/placement` (`CRM_DEAL_DETAIL_ACTIVITY`…).
    Placement,
    /// The installation page POSTed to `/install`.
    Install,
    /// A record of Bitrix24's offline-event queue (`event.offline.get`), published by
    /// the worker's reconciler: `payload` is the record, `member_id` the portal whose
    /// stored tokens fetched it. The ingress never publishes this kind.
    Offline,
}

impl EnvelopeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Placement => "placement",
            Self::Install => "install",
            Self::Offline => "offline",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// UUID v7: unique per accepted request and ordered by time.
    pub id: Uuid,
    pub kind: EnvelopeKind,
    /// Upper-case event code, placement code, or `INSTALL`.
    pub event: String,
    /// Absent only for events documented without it (`ONAPPPAYMENT`), which carry
    /// `domain` instead.
    pub member_id: Option<MemberId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    pub received_at: DateTime<Utc>,
    /// The decoded body, as Bitrix24 sent it (values are strings for form bodies).
    pub payload: serde_json::Value,
}

impl Envelope {
    pub fn new(
        kind: EnvelopeKind,
        event: String,
        member_id: Option<MemberId>,
        domain: Option<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            kind,
            event,
            member_id,
            domain,
            received_at: Utc::now(),
            payload,
        }
    }

    /// AMQP routing key: `<kind>.<event code in lower case>`, so operators can bind
    /// extra queues to one family of events.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.kind.as_str(), self.event.to_ascii_lowercase())
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Sized for a typical event, so the buffer is not regrown on the way.
        let mut out = Vec::with_capacity(1024);
        // Serializing a struct of strings, a UUID, a timestamp and a Value cannot fail.
        match serde_json::to_writer(&mut out, self) {
            Ok(()) => out,
            Err(_) => Vec::new(),
        }
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let env = Envelope::new(
            EnvelopeKind::Event,
            "ONCRMREQUISITEADD".into(),
            Some(MemberId::parse("a223c6b3710f85df22e9377d6c4f7553").unwrap()),
            None,
            serde_json::json!({"data": {"FIELDS": {"ID": "27"}}}),
        );
        let back = Envelope::from_json(&env.to_json()).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.id.get_version_num(), 7);
        assert_eq!(env.routing_key(), "event.oncrmrequisiteadd");
        let wire: serde_json::Value = serde_json::from_slice(&env.to_json()).unwrap();
        assert_eq!(wire["kind"], "event");
        assert_eq!(wire["member_id"], "a223c6b3710f85df22e9377d6c4f7553");
    }
}
