//! What the edge does with each kind of message before publishing it: which check of
//! its portal applies, and which OAuth tokens the queued copy keeps, read off the
//! shared list of known events ([`KnownEvent`]).
//! What a newcomer gets wrong: a token that is queued is a token at rest in the broker
//! (and in every dead letter), so a message keeps only the tokens its handler uses.

use b24_shared::event::KnownEvent;
use b24_shared::EnvelopeKind;
use serde_json::Value;

/// Events whose OAuth tokens the worker needs ([`KnownEvent::needs_event_tokens`]: it
/// proves an installation with them). Every other event loses `auth[access_token]` and
/// `auth[refresh_token]`: the worker calls Bitrix24 with the portal's stored tokens.
fn keeps_oauth_tokens(event: &str) -> bool {
    KnownEvent::from_code(event).is_some_and(KnownEvent::needs_event_tokens)
}

/// Events passed on without checking their portal at the edge: an installation brings
/// a new portal or a new token (the worker proves it with Bitrix24 before anything is
/// stored), and `ONAPPPAYMENT` has no token and maybe no member_id (the worker finds
/// the portal by domain and asks app.info itself).
fn unchecked(event: &str) -> bool {
    KnownEvent::from_code(event).is_some_and(|k| k.needs_event_tokens() || k.unauthenticated())
}

/// How the portal a message claims is checked before it is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortalCheck {
    /// Not at the edge: the worker verifies.
    None,
    /// The portal is installed and the event's `application_token` is its own.
    Token,
    /// The portal is installed (a widget call carries no `application_token`; its
    /// `AUTH_ID` is proved by the worker's call with it).
    Installed,
}

pub fn portal_check(kind: EnvelopeKind, event: &str) -> PortalCheck {
    match kind {
        EnvelopeKind::Install => PortalCheck::None,
        EnvelopeKind::Placement => PortalCheck::Installed,
        EnvelopeKind::Event if unchecked(event) => PortalCheck::None,
        // The ingress never publishes offline records (the worker's reconciler does).
        EnvelopeKind::Event | EnvelopeKind::Offline => PortalCheck::Token,
    }
}

/// Removes from `payload` the tokens its handler does not use. The install page keeps
/// `AUTH_ID` and `REFRESH_ID` (the worker proves them with a refresh); a widget call
/// keeps `AUTH_ID` (the worker calls `crm.item.get` as that user) but not
/// `REFRESH_ID`; events keep `application_token` (the worker checks it again).
pub fn strip_tokens(kind: EnvelopeKind, event: &str, payload: &mut Value) {
    match kind {
        EnvelopeKind::Install => {}
        EnvelopeKind::Placement => {
            if let Some(call) = payload.as_object_mut() {
                call.remove("REFRESH_ID");
            }
        }
        EnvelopeKind::Event if keeps_oauth_tokens(event) => {}
        EnvelopeKind::Event | EnvelopeKind::Offline => {
            if let Some(auth) = payload.get_mut("auth").and_then(Value::as_object_mut) {
                auth.remove("access_token");
                auth.remove("refresh_token");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn installation_events_keep_their_tokens_and_others_lose_them() {
        let event = || {
            json!({"auth": {"access_token": "a", "refresh_token": "r",
                                        "application_token": "t", "member_id": "m"}})
        };
        for code in ["ONAPPINSTALL", "ONAPPUPDATE"] {
            let mut p = event();
            strip_tokens(EnvelopeKind::Event, code, &mut p);
            assert_eq!(p, event(), "{code}");
        }
        let mut p = event();
        strip_tokens(EnvelopeKind::Event, "ONCRMDEALADD", &mut p);
        assert_eq!(
            p,
            json!({"auth": {"application_token": "t", "member_id": "m"}})
        );
        let call = || json!({"AUTH_ID": "a", "REFRESH_ID": "r", "member_id": "m"});
        let mut p = call();
        strip_tokens(EnvelopeKind::Placement, "CRM_DEAL_DETAIL_ACTIVITY", &mut p);
        assert_eq!(p, json!({"AUTH_ID": "a", "member_id": "m"}));
        let mut p = call();
        strip_tokens(EnvelopeKind::Install, "INSTALL", &mut p);
        assert_eq!(p, call());
    }

    #[test]
    fn only_installations_and_payments_skip_the_portal_check() {
        use PortalCheck::*;
        assert_eq!(portal_check(EnvelopeKind::Install, "INSTALL"), None);
        assert_eq!(portal_check(EnvelopeKind::Event, "ONAPPINSTALL"), None);
        assert_eq!(portal_check(EnvelopeKind::Event, "ONAPPUPDATE"), None);
        assert_eq!(portal_check(EnvelopeKind::Event, "ONAPPPAYMENT"), None);
        assert_eq!(portal_check(EnvelopeKind::Event, "ONAPPUNINSTALL"), Token);
        assert_eq!(
            portal_check(EnvelopeKind::Event, "ONCRMREQUISITEADD"),
            Token
        );
        assert_eq!(
            portal_check(EnvelopeKind::Placement, "CRM_DEAL_DETAIL_ACTIVITY"),
            Installed
        );
    }
}
