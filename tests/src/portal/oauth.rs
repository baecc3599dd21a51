//! The authorization server, on a listener of its own (oauth.bitrix.info is a host of
//! its own): `/oauth/token/` refreshes tokens (settings/oauth/auto-renewal.md) and
//! `/rest/app.info` answers for the token's application, the trusted source of its
//! status (settings/oauth/simple-way.md: "To obtain a trusted status, call the app.info
//! method on the authorization server").
//!
//! What a newcomer gets wrong: a token is bound to the application it was issued to.
//! Our `client_id`/`client_secret` refresh only our tokens; another application's
//! refresh token is refused with `invalid_grant` (RFC 6749 5.2: "issued to another
//! client"), which is how the pipeline proves an install is ours.

use super::params::text;
use super::state::State;
use super::{read_body, request_params, take_token, ApiError, Call, CallKind, Inner, Reply};
use hyper::body::Incoming;
use hyper::Request;
use serde_json::{json, Value};
use std::time::Instant;

pub(super) async fn handle(portal: &Inner, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    let (parts, body) = req.into_parts();
    let Some(body) = read_body(body).await else {
        return Reply::Raw(413, "Request Entity Too Large".into());
    };
    let mut params = request_params(&parts, &body);
    match path.trim_end_matches('/') {
        "/oauth/token" => token(&mut portal.state(), params.to_json()),
        p if p.starts_with("/rest/") => {
            let method = super::methods::normalize_method(&p["/rest/".len()..]);
            let token = take_token(&mut params, &parts);
            rest(&mut portal.state(), &method, token)
        }
        _ => Reply::Raw(404, "Not Found".into()),
    }
}

fn record(s: &mut State, method: &str, reply: &Reply, token: Option<String>, params: Value) {
    let (status, error) = match reply {
        Reply::Json(status, v) => (
            *status,
            v.get("error").and_then(Value::as_str).map(str::to_owned),
        ),
        Reply::Raw(status, _) => (*status, None),
        Reply::Redirect(_) => (302, None),
        Reply::Drop => (0, None),
    };
    s.calls.push(Call {
        kind: CallKind::OAuth,
        method: method.to_owned(),
        status,
        error,
        token,
        params,
        batch_size: None,
        at: Instant::now(),
    });
}

/// `/oauth/token/`: parameters read by their documented names, exactly
/// (`grant_type`, `client_id`, `client_secret`, `refresh_token`).
fn token(s: &mut State, params: Value) -> Reply {
    let refresh = text(&params, "refresh_token").unwrap_or_default();
    let reply = refresh_answer(s, &params, &refresh, Instant::now());
    let mut recorded = params;
    if let Some(o) = recorded.as_object_mut() {
        o.remove("client_secret");
    }
    let token = (!refresh.is_empty()).then_some(refresh);
    record(s, "oauth.token", &reply, token, recorded);
    reply
}

fn refresh_answer(s: &mut State, params: &Value, refresh: &str, now: Instant) -> Reply {
    if let Some(f) = s.fail_oauth.pop_front() {
        return f.into();
    }
    let grant = text(params, "grant_type").unwrap_or_default();
    if grant.is_empty() {
        return ApiError::with(400, "invalid_request", "grant_type is required").into();
    }
    let client_id = text(params, "client_id").unwrap_or_default();
    let client_secret = text(params, "client_secret").unwrap_or_default();
    let Some(app) = s
        .app(&client_id)
        .filter(|a| a.client_secret == client_secret)
        .cloned()
    else {
        // RFC 6749 5.2: client authentication failed, 401.
        return ApiError::with(401, "invalid_client", "Invalid client").into();
    };
    if grant != "refresh_token" {
        return ApiError::with(400, "invalid_grant", "Unsupported grant type").into();
    }
    if refresh.is_empty() {
        return ApiError::with(400, "invalid_request", "refresh_token is required").into();
    }
    if app.removed {
        // settings/oauth/error-codes.md: invalid_client, "The application may not be
        // installed in Bitrix24".
        return ApiError::with(401, "invalid_client", "Application not installed").into();
    }
    if app.payment_required {
        // settings/oauth/error-codes.md: "Until then, the authorization server will not
        // issue tokens". No status is documented: 401, as for the other refusals of a
        // known client.
        return ApiError::new(401, "PAYMENT_REQUIRED").into();
    }
    match s.refresh_pair(refresh, &client_id, now) {
        Ok((access, refresh, user)) => {
            let ttl = s.cfg.token_ttl.as_secs();
            let client_endpoint = s
                .redirect
                .clone()
                .unwrap_or_else(|| s.client_endpoint.clone());
            // The fields of settings/oauth/auto-renewal.md's answer. `domain` and
            // `server_endpoint` are the authorization server's own, not the portal's.
            Reply::Json(
                200,
                json!({
                    "access_token": access,
                    "expires": s.unix(now).floor() as u64 + ttl,
                    "expires_in": ttl,
                    "scope": s.cfg.scope,
                    "domain": s.oauth_domain,
                    "server_endpoint": s.server_endpoint,
                    "status": app.status(),
                    "client_endpoint": client_endpoint,
                    "member_id": s.cfg.member_id,
                    "user_id": user,
                    "refresh_token": refresh,
                }),
            )
        }
        Err(e) => e.into(),
    }
}

/// The authorization server's REST: `app.info` for the token's application (its status
/// and payment state even while the portal refuses the application's calls).
fn rest(s: &mut State, method: &str, token: Option<String>) -> Reply {
    let reply = if method != "app.info" {
        ApiError::new(404, "ERROR_METHOD_NOT_FOUND").into()
    } else {
        match s.check_access(token.as_deref(), Instant::now()) {
            Err(e) => e.into(),
            Ok(caller) => match s.app(&caller.client_id) {
                Some(app) => Reply::Json(200, json!({ "result": app.info })),
                None => ApiError::new(401, "invalid_token").into(),
            },
        }
    };
    record(s, method, &reply, token, json!({}));
    reply
}
