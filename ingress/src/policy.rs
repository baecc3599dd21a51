//! What the edge does with each kind of message before publishing it: which check of
//! its portal applies. The one list, by event code; it is meant to move onto the shared
//! list of known events.

use b24_shared::EnvelopeKind;

/// Events passed on without checking their portal at the edge.
const UNCHECKED_EVENTS: &[&str] = &[
    // An installation brings a new portal or a new token: the worker proves it with
    // Bitrix24 before anything is stored.
    "ONAPPINSTALL",
    "ONAPPUPDATE",
    // No token, and maybe no member_id (it names its portal by domain): the worker
    // finds the portal and asks app.info itself.
    "ONAPPPAYMENT",
];

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
        EnvelopeKind::Event if UNCHECKED_EVENTS.contains(&event) => PortalCheck::None,
        EnvelopeKind::Event => PortalCheck::Token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
