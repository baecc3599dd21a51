//! Installation, from the install page, `ONAPPINSTALL`, or an `ONAPPUPDATE` that brings
//! a new application_token; and the bindings every installation and update sets.
//!
//! A claim is attacker input until proved. Tokens in a request prove nothing by
//! themselves: every user of a portal gets `AUTH_ID`/`REFRESH_ID` in widget calls, and
//! other applications on the portal hold tokens of their own. So, before anything is
//! stored:
//! 1. the portal's authorization server refreshes the offered refresh token with OUR
//!    client credentials (only this application's tokens refresh) and answers with the
//!    claimed member_id and a `client_endpoint` on the claimed domain; the new pair it
//!    returns is the one stored (the offered pair is dead after that);
//! 2. `user.admin` says the installing user is an administrator;
//! 3. `app.info` names this application.
//!
//! The application_token is taken only from a proved `ONAPPINSTALL` (or `ONAPPUPDATE`),
//! never from the install page or any other body. Bitrix24 may hand the same pair to the
//! install page and to `ONAPPINSTALL`, so the second refresh can find the token used: a
//! refresh token equal to one this portal was proved with in the last hour counts as
//! proved (only Bitrix24 and the installing admin's browser ever held it).
//!
//! Then every handled event is bound online and offline, and every placement (a
//! smart-process type each) — on installation and again on every update, because
//! Bitrix24 removes an application's bindings when it is updated.

use super::{Done, Failure};
use crate::bitrix::hosts::domain_of;
use crate::bitrix::{Auth, B24Error, Bitrix, ErrorClass};
use b24_shared::event::{KnownEvent, KnownPlacement, MemberId};
use b24_shared::portals::{self, token_digest, InstallError, VerifiedInstall};
use b24_shared::Secret;
use serde_json::{json, Value};
use std::time::Duration;

/// A refresh token seen in a proof stays good as proof this long.
const PROOF_REUSE: Duration = Duration::from_secs(3600);

/// Offline bindings carry this connector id; a REST call that names it does not
/// produce offline records (our own writes are not echoed back).
pub const AUTH_CONNECTOR: &str = "b24pipeline";

/// Where a claim came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The install page (`/install`): the installing user's `AUTH_ID`/`REFRESH_ID`.
    Page,
    /// `ONAPPINSTALL`: the only place the application_token first comes from.
    InstallEvent,
    /// `ONAPPUPDATE` bringing an application_token other than the stored one.
    UpdateEvent,
}

/// What an installation claims, until proved.
#[derive(Debug, Clone)]
pub struct Claim {
    pub source: Source,
    pub member_id: MemberId,
    pub domain: String,
    pub client_endpoint: String,
    pub server_endpoint: Option<String>,
    pub refresh_token: Option<Secret>,
    /// Only for `InstallEvent`/`UpdateEvent`.
    pub application_token: Option<Secret>,
    pub version: Option<String>,
}

/// What the installation needs from the worker's configuration.
pub struct Settings<'a> {
    pub public_url: &'a str,
    /// `app.info`'s `CODE` for this application.
    pub app_code: Option<&'a str>,
}

fn refused(code: &str, reason: impl Into<String>) -> Failure {
    Failure::drop(code, reason)
}

pub async fn run(bitrix: &Bitrix, settings: &Settings<'_>, claim: Claim) -> Result<Done, Failure> {
    let member_id = claim.member_id.clone();
    let Some(refresh) = claim.refresh_token.clone() else {
        return Err(refused(
            "INSTALL_NOT_PROVEN",
            "an installation without tokens cannot be proved",
        ));
    };
    let claimed_endpoint = bitrix
        .rest
        .endpoint(&claim.client_endpoint)
        .map_err(|e| refused(&e.code, e.to_string()))?;
    let stored = {
        let client = bitrix.pool().get().await?;
        portals::find(&client, &member_id).await?
    };
    let server_endpoint = claim
        .server_endpoint
        .clone()
        .or_else(|| stored.as_ref().and_then(|p| p.server_endpoint.clone()));

    // 1. The authorization server vouches for the tokens, the portal and its address.
    // The refresh consumes the offered token, so its answer is kept until the
    // installation is stored: a retry of this claim continues with it.
    let offered = token_digest(refresh.expose());
    let pair = match kept_proof(bitrix, &offered, &member_id).await? {
        Some(pair) => pair,
        None => match bitrix
            .refresh_at(server_endpoint.as_deref(), &refresh)
            .await
        {
            Ok(pair) => {
                pair.check_member(&member_id)
                    .map_err(|e| refused("INSTALL_NOT_PROVEN", e.to_string()))?;
                let pair = Refreshed {
                    access: pair.access_token,
                    refresh: pair.refresh_token,
                    expires_in: pair.expires_in.unwrap_or(3600),
                    client_endpoint: pair.client_endpoint,
                    status: pair.status,
                };
                keep_proof(
                    bitrix,
                    &offered,
                    &member_id,
                    server_endpoint.as_deref(),
                    &pair,
                )
                .await?;
                pair
            }
            Err(e) if e.code == "invalid_grant" => {
                let proved_lately = stored.as_ref().is_some_and(|p| {
                    p.status.is_live()
                        && p.proven_refresh_sha256.as_deref() == Some(offered.as_str())
                        && p.proven_at.is_some_and(|at| {
                            chrono::Utc::now().signed_duration_since(at).to_std().ok()
                                < Some(PROOF_REUSE)
                        })
                });
                if !proved_lately {
                    return Err(refused(
                        "INSTALL_NOT_PROVEN",
                        "the authorization server refused the offered refresh token",
                    ));
                }
                return proved_earlier(bitrix, settings, &claim).await;
            }
            Err(e) if e.class.is_retryable() || e.class == ErrorClass::Held => return Err(e.into()),
            Err(e) => {
                return Err(refused(
                    "INSTALL_NOT_PROVEN",
                    format!("the authorization server refused the tokens: {e}"),
                ))
            }
        },
    };
    let reported = pair
        .client_endpoint
        .as_deref()
        .ok_or_else(|| {
            refused(
                "INSTALL_NOT_PROVEN",
                "the authorization server named no endpoint",
            )
        })
        .and_then(|e| {
            bitrix
                .rest
                .endpoint(e)
                .map_err(|e| refused("INSTALL_NOT_PROVEN", e.to_string()))
        })?;
    let domain = domain_of(&reported).unwrap_or_default();
    let claimed_domain = claim.domain.trim().to_ascii_lowercase();
    if domain != claimed_domain || domain_of(&claimed_endpoint).as_deref() != Some(&domain) {
        return Err(refused(
            "INSTALL_HOST_MISMATCH",
            "the portal's address differs from the one the authorization server knows",
        ));
    }

    // 2. and 3.: an administrator installed this application.
    let user = Auth::User {
        endpoint: reported.clone(),
        token: pair.access.clone(),
    };
    let admin = bitrix
        .call_patiently(&member_id, &user, "user.admin", &json!({}))
        .await
        .map_err(proof_failure)?;
    if admin.result != Value::Bool(true) {
        return Err(refused(
            "INSTALLER_NOT_ADMIN",
            "the installing user is not an administrator of the portal",
        ));
    }
    let info = bitrix
        .call_patiently(&member_id, &user, "app.info", &json!({}))
        .await
        .map_err(proof_failure)?;
    let code = info.result.get("CODE").and_then(Value::as_str);
    if let Some(ours) = settings.app_code {
        if code != Some(ours) {
            return Err(refused(
                "WRONG_APPLICATION",
                "the tokens belong to another application",
            ));
        }
    }
    let cipher = bitrix.cipher();
    let verified = VerifiedInstall {
        member_id: member_id.clone(),
        domain: domain.clone(),
        client_endpoint: reported.to_string(),
        server_endpoint: server_endpoint.filter(|s| bitrix.rest.allowed_hosts().check(s).is_ok()),
        access_token: cipher.seal(&member_id, &pair.access),
        refresh_token: cipher.seal(&member_id, &pair.refresh),
        expires_in_secs: pair.expires_in,
        application_token: match claim.source {
            Source::Page => None,
            Source::InstallEvent | Source::UpdateEvent => claim.application_token.clone(),
        },
        app_status: info
            .result
            .get("STATUS")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or(pair.status.clone()),
        app_version: claim.version.clone().or_else(|| {
            info.result.get("VERSION").map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        }),
        proven_refresh_sha256: token_digest(refresh.expose()),
    };
    store(bitrix, &verified, claim.source, stored.is_some()).await?;
    {
        let client = bitrix.pool().get().await?;
        portals::forget_proof(&client, &offered).await?;
    }
    tracing::info!(%member_id, %domain, source = ?claim.source, "installation proved and stored");
    bind_all(bitrix, &member_id, settings.public_url).await?;
    Ok(Done::Stored)
}

/// The pair a refresh returned for a proof.
struct Refreshed {
    access: Secret,
    refresh: Secret,
    expires_in: i64,
    client_endpoint: Option<String>,
    status: Option<String>,
}

/// The pair of a proof already made with this offered token (a retry of the claim).
async fn kept_proof(
    bitrix: &Bitrix,
    offered: &str,
    member_id: &MemberId,
) -> Result<Option<Refreshed>, Failure> {
    let proof = {
        let client = bitrix.pool().get().await?;
        portals::find_proof(&client, offered).await?
    };
    let Some(proof) = proof else {
        return Ok(None);
    };
    if proof.member_id != *member_id {
        return Err(refused(
            "INSTALL_NOT_PROVEN",
            "the refresh token was proved for another portal",
        ));
    }
    let open = |s: &portals::Sealed| {
        bitrix
            .cipher()
            .open(member_id, s)
            .map(crate::crypto::Opened::secret)
            .map_err(|e| Failure::hold("TOKEN_KEY", e.to_string(), crate::bitrix::session::HOLD))
    };
    Ok(Some(Refreshed {
        access: open(&proof.access_token)?,
        refresh: open(&proof.refresh_token)?,
        expires_in: i64::from(proof.expires_in),
        client_endpoint: proof.client_endpoint,
        status: proof.app_status,
    }))
}

async fn keep_proof(
    bitrix: &Bitrix,
    offered: &str,
    member_id: &MemberId,
    server_endpoint: Option<&str>,
    pair: &Refreshed,
) -> Result<(), Failure> {
    let cipher = bitrix.cipher();
    let client = bitrix.pool().get().await?;
    portals::keep_proof(
        &client,
        offered,
        &portals::Proof {
            member_id: member_id.clone(),
            client_endpoint: pair.client_endpoint.clone(),
            server_endpoint: server_endpoint.map(str::to_string),
            access_token: cipher.seal(member_id, &pair.access),
            refresh_token: cipher.seal(member_id, &pair.refresh),
            expires_in: i32::try_from(pair.expires_in).unwrap_or(3600),
            app_status: pair.status.clone(),
        },
    )
    .await?;
    Ok(())
}

/// A step of the proof answered: refusals are verification failures, Bitrix24 being
/// unreachable is retried.
fn proof_failure(e: B24Error) -> Failure {
    let unreachable = e.class.is_retryable() && e.class != ErrorClass::NeedsRefresh;
    if unreachable || e.class == ErrorClass::Held {
        e.into()
    } else {
        refused("INSTALL_NOT_PROVEN", e.to_string())
    }
}

async fn store(
    bitrix: &Bitrix,
    v: &VerifiedInstall,
    source: Source,
    known: bool,
) -> Result<(), Failure> {
    let mut client = bitrix.pool().get().await?;
    let tx = client.transaction().await?;
    match portals::install(&tx, v).await {
        Ok(()) => {}
        Err(InstallError::DomainTaken(domain)) => {
            return Err(refused(
                "DOMAIN_TAKEN",
                format!("domain {domain} belongs to another installed portal"),
            ))
        }
        Err(InstallError::Db(e)) => return Err(e.into()),
    }
    portals::audit(
        &tx,
        &v.member_id,
        if known { "reinstalled" } else { "installed" },
        json!({
            "source": format!("{source:?}"),
            "domain": v.domain,
            "application_token": v.application_token.is_some(),
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// `ONAPPINSTALL` carrying the very refresh token the install page was proved with a
/// moment ago: its application_token is stored; the stored pair stays.
async fn proved_earlier(
    bitrix: &Bitrix,
    settings: &Settings<'_>,
    claim: &Claim,
) -> Result<Done, Failure> {
    let Some(token) = &claim.application_token else {
        // The install page again: nothing new to store.
        return Ok(Done::Stored);
    };
    {
        let client = bitrix.pool().get().await?;
        portals::set_application_token(&client, &claim.member_id, token).await?;
        portals::audit(
            &client,
            &claim.member_id,
            "application_token",
            json!({"source": format!("{:?}", claim.source), "proved": "earlier refresh"}),
        )
        .await?;
    }
    tracing::info!(member_id = %claim.member_id, "application_token stored (tokens proved by the install page)");
    bind_all(bitrix, &claim.member_id, settings.public_url).await?;
    Ok(Done::Stored)
}

/// `ONAPPUPDATE` with the portal's own application_token: Bitrix24 removed every
/// binding with the update, so all are set again.
pub async fn rebind(
    bitrix: &Bitrix,
    public_url: &str,
    member_id: &MemberId,
    version: Option<&str>,
) -> Result<Done, Failure> {
    bind_all(bitrix, member_id, public_url).await?;
    let client = bitrix.pool().get().await?;
    portals::audit(&client, member_id, "updated", json!({ "version": version })).await?;
    tracing::info!(%member_id, ?version, "application updated; bindings set again");
    Ok(Done::Stored)
}

/// Binds every handled event (online, and offline where [`KnownEvent::bound_offline`])
/// and every placement, dynamic types included, with the stored tokens.
pub async fn bind_all(
    bitrix: &Bitrix,
    member_id: &MemberId,
    public_url: &str,
) -> Result<(), Failure> {
    let handler = format!("{public_url}/events");
    for event in KnownEvent::ALL {
        if event.bound_online() {
            let params = json!({ "event": event.code(), "handler": handler });
            bind(bitrix, member_id, "event.bind", params).await?;
        }
        if event.bound_offline() {
            let params = json!({
                "event": event.code(),
                "event_type": "offline",
                "auth_connector": AUTH_CONNECTOR,
            });
            bind(bitrix, member_id, "event.bind", params).await?;
        }
    }
    let mut placements = KnownPlacement::STATIC.to_vec();
    placements.extend(
        smart_process_types(bitrix, member_id)
            .await?
            .into_iter()
            .map(KnownPlacement::Dynamic),
    );
    let handler = format!("{public_url}/placement");
    for placement in placements {
        let params = json!({
            "PLACEMENT": placement.code(),
            "HANDLER": handler,
            "TITLE": "b24-pipeline",
        });
        bind(bitrix, member_id, "placement.bind", params).await?;
    }
    Ok(())
}

/// The portal's smart-process types (`crm.type.list`, every page).
async fn smart_process_types(bitrix: &Bitrix, member_id: &MemberId) -> Result<Vec<u32>, Failure> {
    let mut types = Vec::new();
    let mut start: Option<u64> = None;
    loop {
        let params = match start {
            Some(s) => json!({ "start": s }),
            None => json!({}),
        };
        let answer = bitrix
            .call_patiently(member_id, &Auth::Stored, "crm.type.list", &params)
            .await?;
        let page = answer
            .result
            .get("types")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        types.extend(page.iter().filter_map(|t| {
            let id = t.get("entityTypeId")?;
            match id {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            }
            .and_then(|n| u32::try_from(n).ok())
        }));
        match answer.next {
            Some(n) if !page.is_empty() && Some(n) != start => start = Some(n),
            _ => break,
        }
    }
    types.sort_unstable();
    types.dedup();
    Ok(types)
}

/// Binding twice is how a re-install looks: Bitrix24 says the handler is already bound.
async fn bind(
    bitrix: &Bitrix,
    member_id: &MemberId,
    method: &str,
    params: Value,
) -> Result<(), Failure> {
    match bitrix
        .call_patiently(member_id, &Auth::Stored, method, &params)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.description.to_ascii_lowercase().contains("already") => Ok(()),
        Err(e) => Err(e.into()),
    }
}
