//! Request handling. The rule every branch keeps: 200 only after the broker confirmed;
//! anything refused is refused before publishing, with a one-line reason.

use crate::html;
use crate::metrics::IngressMetrics;
use crate::policy::{self, PortalCheck};
use crate::portals::{PortalCache, Verdict};
use b24_shared::amqp::{PublishError, Publisher};
use b24_shared::event::{decode_body, InboundError, InboundEvent, InstallCall, PlacementCall};
use b24_shared::form::FormLimits;
use b24_shared::{Envelope, EnvelopeKind};
use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use lapin::types::FieldTable;
use std::time::{Duration, Instant};

pub struct State {
    pub publisher: Publisher,
    pub portals: PortalCache,
    pub metrics: IngressMetrics,
    pub limits: FormLimits,
    pub body_limit: usize,
    /// `PUBLIC_URL`, where the install page binds events.
    pub public_url: String,
    /// The whole request must have arrived within this of its first byte.
    pub request_timeout: Duration,
}

type Resp = Response<Full<Bytes>>;

/// Seconds a client is told to wait after a 503.
const RETRY_AFTER_SECS: &str = "5";

/// Answers one request; its body must have arrived by `deadline`.
pub async fn handle(state: &State, req: Request<Incoming>, deadline: Instant) -> Resp {
    let m = &state.metrics;
    m.in_flight.inc();
    let route = route_name(req.uri().path());
    let resp = match (req.method(), route) {
        (&Method::POST, "events" | "placement" | "install") => {
            accept(state, route, req, deadline).await
        }
        (&Method::GET | &Method::HEAD, "healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET | &Method::HEAD, "readyz") => {
            if state.publisher.is_connected() {
                text(StatusCode::OK, "ready")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "broker is not connected")
            }
        }
        (&Method::GET, "metrics") => {
            let (content_type, body) = b24_shared::metrics::render(&m.registry);
            with_type(Response::new(Full::from(body)), &content_type)
        }
        (_, "events" | "placement" | "install") => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: use POST",
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            r
        }
        (_, "healthz" | "readyz" | "metrics") => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: use GET",
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    };
    m.requests
        .with_label_values(&[route, resp.status().as_str()])
        .inc();
    m.in_flight.dec();
    resp
}

fn route_name(path: &str) -> &'static str {
    match path.trim_end_matches('/') {
        "/events" => "events",
        "/placement" => "placement",
        "/install" => "install",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        _ => "other",
    }
}

async fn accept(
    state: &State,
    route: &'static str,
    req: Request<Incoming>,
    deadline: Instant,
) -> Resp {
    let reject = |status: StatusCode, reason: &'static str, msg: String| {
        state.metrics.rejections.with_label_values(&[reason]).inc();
        text(status, &msg)
    };

    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.body_limit as u64) {
        return reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body too large: at most {} bytes", state.body_limit),
        );
    }
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not ASCII)").to_string());
    let query = req.uri().query().map(str::to_string);
    let read = Limited::new(req.into_body(), state.body_limit).collect();
    let body = match tokio::time::timeout_at(deadline.into(), read).await {
        Err(_late) => {
            state
                .metrics
                .rejections
                .with_label_values(&["request_timeout"])
                .inc();
            let mut r = text(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "request body not received within {} ms",
                    state.request_timeout.as_millis()
                ),
            );
            // The rest of the body may still come; the connection is not reusable.
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("body too large: at most {} bytes", state.body_limit),
            );
        }
        Ok(Err(_)) => {
            return reject(
                StatusCode::BAD_REQUEST,
                "body_read",
                "request body could not be read".into(),
            );
        }
    };

    let parsed = decode_body(
        content_type.as_deref(),
        &body,
        query.as_deref(),
        &state.limits,
    )
    .and_then(|value| parse(route, value, &state.public_url));
    let (mut envelope, page) = match parsed {
        Ok(p) => p,
        Err(e) => {
            let status = if e.is_unsupported_media_type() {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            } else {
                StatusCode::BAD_REQUEST
            };
            return reject(status, e.reason(), e.to_string());
        }
    };

    if let Err(refused) = check_portal(state, &envelope).await {
        return refused;
    }
    policy::strip_tokens(envelope.kind, &envelope.event, &mut envelope.payload);

    let started = Instant::now();
    let result = state
        .publisher
        .publish(
            &envelope.routing_key(),
            &envelope.to_json(),
            &envelope.id.to_string(),
            FieldTable::default(),
        )
        .await;
    let outcome = match &result {
        Ok(()) => "confirmed",
        Err(e) => e.reason(),
    };
    state
        .metrics
        .publish_confirm
        .with_label_values(&[outcome])
        .observe(started.elapsed().as_secs_f64());

    match result {
        Ok(()) => {
            let event = b24_shared::metrics::envelope_label(envelope.kind, &envelope.event);
            state.metrics.events.with_label_values(&[event]).inc();
            tracing::debug!(id = %envelope.id, event = %envelope.event, member_id = ?envelope.member_id.as_ref().map(|m| m.as_str()), "queued");
            match page {
                Some(html) => {
                    with_type(Response::new(Full::from(html)), "text/html; charset=utf-8")
                }
                None => with_type(
                    Response::new(Full::from(format!("{{\"id\":\"{}\"}}\n", envelope.id))),
                    "application/json",
                ),
            }
        }
        Err(e) => unavailable(state, &e),
    }
}

/// Refuses, before anything is published, what the worker would only throw away:
/// events of a known portal with another token (401) and messages of portals that are
/// not installed (403). What the database could not rule on passes: the worker checks.
async fn check_portal(state: &State, envelope: &Envelope) -> Result<(), Resp> {
    let check = policy::portal_check(envelope.kind, &envelope.event);
    let Some(member_id) = envelope.member_id.as_ref().map(|m| m.as_str()) else {
        // Only events documented without member_id (ONAPPPAYMENT) get here, and their
        // portal is the worker's to find.
        return Ok(());
    };
    let token = application_token(envelope);
    let verdict = match check {
        PortalCheck::None => return Ok(()),
        PortalCheck::Token => state.portals.verify(member_id, token).await,
        PortalCheck::Installed => state.portals.installed(member_id).await,
    };
    match verdict {
        Verdict::Genuine | Verdict::Unverified => Ok(()),
        Verdict::Forged => Err(refuse(
            state,
            StatusCode::UNAUTHORIZED,
            "forged_token",
            match token {
                Some(_) => "auth[application_token] does not match this portal's",
                None => "auth[application_token] is missing",
            },
        )),
        Verdict::Unknown => Err(refuse(
            state,
            StatusCode::FORBIDDEN,
            "unknown_portal",
            "portal is not installed: no installed portal has this member_id",
        )),
    }
}

/// The application_token an event carries.
fn application_token(envelope: &Envelope) -> Option<&str> {
    envelope
        .payload
        .get("auth")?
        .get("application_token")?
        .as_str()
        .filter(|t| !t.is_empty())
}

fn refuse(state: &State, status: StatusCode, reason: &'static str, msg: &str) -> Resp {
    state.metrics.rejections.with_label_values(&[reason]).inc();
    text(status, msg)
}

fn unavailable(state: &State, e: &PublishError) -> Resp {
    state
        .metrics
        .rejections
        .with_label_values(&["unavailable"])
        .inc();
    tracing::warn!(error = %e, "event not durable; answering 503");
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("event could not be made durable: {e}"),
    );
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    r
}

/// Parses the decoded body for its route: the envelope to publish and, for the
/// browser-facing routes, the page to answer with.
fn parse(
    route: &str,
    value: serde_json::Value,
    public_url: &str,
) -> Result<(Envelope, Option<String>), InboundError> {
    match route {
        "events" => {
            let e = InboundEvent::parse(&value)?;
            let domain = e.auth.domain.clone();
            Ok((
                Envelope::new(
                    EnvelopeKind::Event,
                    e.event.as_str().to_string(),
                    e.auth.member_id,
                    domain,
                    value,
                ),
                None,
            ))
        }
        "placement" => {
            let p = PlacementCall::parse(&value)?;
            // Bitrix24 always sends the user's AUTH_ID; the worker serves a widget only
            // with it, never with the portal's own tokens.
            if p.auth_id.is_none() {
                return Err(InboundError::Missing("AUTH_ID"));
            }
            let page = html::placement_page(
                p.lang.as_deref().unwrap_or("en"),
                p.placement.as_str(),
                p.crm_item_id().ok(),
                &p.domain,
            );
            Ok((
                Envelope::new(
                    EnvelopeKind::Placement,
                    p.placement.as_str().to_string(),
                    Some(p.member_id),
                    Some(p.domain),
                    value,
                ),
                Some(page),
            ))
        }
        _ => {
            let i = InstallCall::parse(&value)?;
            let page = html::install_page(i.lang.as_deref().unwrap_or("en"), &i.domain, public_url);
            Ok((
                Envelope::new(
                    EnvelopeKind::Install,
                    "INSTALL".to_string(),
                    Some(i.member_id),
                    Some(i.domain),
                    value,
                ),
                Some(page),
            ))
        }
    }
}

fn text(status: StatusCode, msg: &str) -> Resp {
    let mut r = Response::new(Full::from(format!("{msg}\n")));
    *r.status_mut() = status;
    with_type(r, "text/plain; charset=utf-8")
}

fn with_type(mut r: Resp, content_type: &str) -> Resp {
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}
