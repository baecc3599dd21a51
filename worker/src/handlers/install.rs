//! Installation, from the `ONAPPINSTALL` event or the install page. Nothing is stored
//! until one authorized call (`app.info`) with the offered tokens succeeds against the
//! offered endpoint, and that endpoint must be in `B24_ALLOWED_HOSTS`: an install
//! message is attacker input until Bitrix24 itself has vouched for the tokens. Then
//! the worker binds the events and placements it handles to the ingress.

use super::Failure;
use crate::bitrix::{Auth, Bitrix};
use crate::store::{Installation, Store};
use b24_shared::event::{InboundEvent, InstallCall};
use serde_json::json;

/// Events bound at installation (ONAPPINSTALL itself is set in the app's settings).
pub const BOUND_EVENTS: &[&str] = &[
    "ONCRMDEALRECURRINGEXPOSE",
    "ONCRMREQUISITEADD",
    "ONAPPPAYMENT",
    "ONAPPUNINSTALL",
];

/// Placements bound at installation; dynamic types are bound by the app per type.
pub const BOUND_PLACEMENTS: &[&str] = &[
    "CRM_LEAD_DETAIL_ACTIVITY",
    "CRM_DEAL_DETAIL_ACTIVITY",
    "CRM_CONTACT_DETAIL_ACTIVITY",
    "CRM_COMPANY_DETAIL_ACTIVITY",
    "CRM_QUOTE_DETAIL_ACTIVITY",
    "CRM_SMART_INVOICE_DETAIL_ACTIVITY",
];

/// What an installation offers, until `app.info` has vouched for it.
impl Installation {
    pub fn from_event(e: &InboundEvent) -> Result<Self, Failure> {
        let a = &e.auth;
        let missing =
            |what: &str| Failure::dead("MALFORMED_PAYLOAD", format!("ONAPPINSTALL without {what}"));
        Ok(Self {
            member_id: a
                .member_id
                .as_ref()
                .ok_or_else(|| missing("auth[member_id]"))?
                .to_string(),
            domain: a.domain.clone().ok_or_else(|| missing("auth[domain]"))?,
            client_endpoint: a
                .client_endpoint
                .clone()
                .ok_or_else(|| missing("auth[client_endpoint]"))?,
            server_endpoint: a.server_endpoint.clone(),
            access_token: a
                .access_token
                .clone()
                .ok_or_else(|| missing("auth[access_token]"))?,
            refresh_token: a
                .refresh_token
                .clone()
                .ok_or_else(|| missing("auth[refresh_token]"))?,
            expires_in: a.expires_in.unwrap_or(3600),
            application_token: a.application_token.clone(),
        })
    }

    pub fn from_page(i: &InstallCall) -> Self {
        // PROTOCOL 0 is plain http (on-premise installs); the allowlist decides.
        let scheme = if i.protocol.as_deref() == Some("0") {
            "http"
        } else {
            "https"
        };
        Self {
            member_id: i.member_id.to_string(),
            domain: i.domain.clone(),
            client_endpoint: format!("{scheme}://{}/rest/", i.domain),
            server_endpoint: i.server_endpoint.clone(),
            access_token: i.auth_id.clone(),
            refresh_token: i.refresh_id.clone(),
            expires_in: i.auth_expires.unwrap_or(3600),
            application_token: i.application_token.clone(),
        }
    }
}

pub async fn run(
    bitrix: &Bitrix,
    store: &Store,
    public_url: &str,
    req: Installation,
) -> Result<(), Failure> {
    let endpoint = bitrix.rest.endpoint(&req.client_endpoint)?;
    // A re-install may not move a known portal to another host: that would let anyone
    // with a token of their own portal take over another portal's row.
    if let Some(known) = store.portal(Some(&req.member_id), None).await? {
        let known_host = url::Url::parse(&known.client_endpoint)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase));
        if known_host.as_deref() != endpoint.host_str().map(str::to_ascii_lowercase).as_deref() {
            return Err(Failure::dead(
                "PORTAL_ENDPOINT_MISMATCH",
                "install for a known member_id names another host",
            ));
        }
    }
    let auth = Auth::Given {
        endpoint: endpoint.clone(),
        token: req.access_token.clone(),
    };
    bitrix
        .call(&req.member_id, &auth, "app.info", &json!({}))
        .await?;
    store
        .install(&Installation {
            client_endpoint: endpoint.to_string(),
            ..req.clone()
        })
        .await?;
    tracing::info!(member_id = %req.member_id, domain = %req.domain, "portal installed");

    for event in BOUND_EVENTS {
        let params = json!({ "event": event, "handler": format!("{public_url}/events") });
        bind(bitrix, &req.member_id, "event.bind", params).await?;
    }
    for placement in BOUND_PLACEMENTS {
        let params = json!({
            "PLACEMENT": placement,
            "HANDLER": format!("{public_url}/placement"),
            "TITLE": "b24-pipeline",
        });
        bind(bitrix, &req.member_id, "placement.bind", params).await?;
    }
    Ok(())
}

/// Binding twice is how a re-install looks: Bitrix24 says the handler is already bound.
async fn bind(
    bitrix: &Bitrix,
    member_id: &str,
    method: &str,
    params: serde_json::Value,
) -> Result<(), Failure> {
    match bitrix.call(member_id, &Auth::Stored, method, &params).await {
        Ok(_) => Ok(()),
        Err(e) if e.description.to_ascii_lowercase().contains("already") => Ok(()),
        Err(e) => Err(e.into()),
    }
}
