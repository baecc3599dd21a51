//! Typed inbound messages, parsed once at the edge from the decoded body: events
//! (`/events`), widget calls (`/placement`) and the install page (`/install`).
//! Bitrix24 sends every value as a string in forms but the docs show numbers in JSON,
//! so scalar fields accept both; codes arrive in any letter case (`onCrmRequisiteAdd`).

mod known;
pub use known::{KnownEvent, KnownPlacement};

use crate::form::{decode_form, may_hold_nul, nul_field, FormError, FormLimits};
use crate::Secret;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// Why an inbound body was refused. `Display` is the one-line reason the HTTP answer
/// carries; it names fields, never their values (values may be tokens).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InboundError {
    #[error("unsupported content type `{0}`: expected application/x-www-form-urlencoded or application/json")]
    UnsupportedContentType(String),
    #[error("empty body: expected a Bitrix24 form or JSON object")]
    EmptyBody,
    #[error(transparent)]
    Form(#[from] FormError),
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("JSON body must be an object, got {0}")]
    NotAnObject(&'static str),
    #[error("JSON nesting is deeper than {0} levels")]
    TooDeep(usize),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}`: expected {expected}")]
    Invalid {
        field: &'static str,
        expected: &'static str,
    },
    /// PostgreSQL cannot store a NUL in text or jsonb.
    #[error("field `{0}` contains a NUL character, which cannot be stored")]
    Nul(String),
}

impl InboundError {
    /// Low-cardinality label for the rejection metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnsupportedContentType(_) => "content_type",
            Self::EmptyBody => "empty_body",
            Self::Form(_) => "form",
            Self::Json(_) | Self::NotAnObject(_) => "json",
            Self::TooDeep(_) => "too_deep",
            Self::Missing(_) => "missing_field",
            Self::Invalid { .. } => "invalid_field",
            Self::Nul(_) => "nul",
        }
    }

    pub fn is_unsupported_media_type(&self) -> bool {
        matches!(self, Self::UnsupportedContentType(_))
    }
}

/// Decodes a request body by its content type. Query-string pairs (Bitrix24 puts
/// `DOMAIN`, `PROTOCOL`, `LANG`, `APP_SID` in the URL of widget and install calls) are
/// merged under the body's keys: the body wins.
pub fn decode_body(
    content_type: Option<&str>,
    body: &[u8],
    query: Option<&str>,
    limits: &FormLimits,
) -> Result<Value, InboundError> {
    let mime = content_type
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let mut value = match mime.as_str() {
        "application/x-www-form-urlencoded" => {
            if body.is_empty() && query.is_none_or(str::is_empty) {
                return Err(InboundError::EmptyBody);
            }
            decode_form(body, limits)?
        }
        "application/json" => {
            if body.iter().all(u8::is_ascii_whitespace) {
                return Err(InboundError::EmptyBody);
            }
            let value: Value =
                serde_json::from_slice(body).map_err(|e| InboundError::Json(json_reason(&e)))?;
            if !value.is_object() {
                return Err(InboundError::NotAnObject(json_type(&value)));
            }
            if depth(&value) > limits.max_depth + 1 {
                return Err(InboundError::TooDeep(limits.max_depth));
            }
            value
        }
        _ => return Err(InboundError::UnsupportedContentType(truncate(&mime, 60))),
    };
    if let (Some(q), Some(obj)) = (query.filter(|q| !q.is_empty()), value.as_object_mut()) {
        if let Value::Object(from_query) = decode_form(q.as_bytes(), limits)? {
            for (k, v) in from_query {
                obj.entry(k).or_insert(v);
            }
        }
    }
    if may_hold_nul(body) || query.is_some_and(|q| may_hold_nul(q.as_bytes())) {
        if let Some(field) = nul_field(&value) {
            return Err(InboundError::Nul(field));
        }
    }
    Ok(value)
}

fn json_reason(e: &serde_json::Error) -> String {
    // serde_json's message carries no input text, only position and category.
    format!("{} at line {} column {}", category(e), e.line(), e.column())
}

fn category(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "read error",
        Category::Syntax => "syntax error",
        Category::Data => "unexpected data",
        Category::Eof => "unexpected end of input",
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Nesting depth without recursion (serde_json already caps recursion at 128).
fn depth(v: &Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|c| (c, d + 1))),
            Value::Object(o) => stack.extend(o.values().map(|c| (c, d + 1))),
            _ => {}
        }
    }
    max
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

macro_rules! code_newtype {
    ($(#[$doc:meta])* $name:ident, $field:literal, $expected:literal, $max:literal, $valid:expr, $normalize:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(raw: &str) -> Result<Self, InboundError> {
                let raw = raw.trim();
                let valid: fn(u8) -> bool = $valid;
                if raw.is_empty() || raw.len() > $max || !raw.bytes().all(valid) {
                    return Err(InboundError::Invalid { field: $field, expected: $expected });
                }
                let normalize: fn(&str) -> String = $normalize;
                Ok(Self(normalize(raw)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InboundError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

code_newtype!(
    /// A portal's identifier (`member_id`), 32 hex characters in practice.
    MemberId, "member_id", "1 to 64 letters, digits, - or _", 64,
    |b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_',
    |s| s.to_string()
);
code_newtype!(
    /// An event code, kept in upper case: Bitrix24 documents `onCrmRequisiteAdd` but
    /// sends `ONCRMREQUISITEADD`.
    EventCode, "event", "an event code of letters, digits and _", 100,
    |b| b.is_ascii_alphanumeric() || b == b'_',
    |s| s.to_ascii_uppercase()
);
code_newtype!(
    /// A widget placement code such as `CRM_DYNAMIC_183_DETAIL_ACTIVITY`.
    PlacementCode, "PLACEMENT", "a placement code of letters, digits and _", 100,
    |b| b.is_ascii_alphanumeric() || b == b'_',
    |s| s.to_ascii_uppercase()
);

/// `auth` of an event. Tokens are optional: Bitrix24 omits them when the change was
/// not made by a user, and `ONAPPPAYMENT`/`ONAPPUNINSTALL` never carry them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventAuth {
    pub access_token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    pub expires_in: Option<i64>,
    pub scope: Option<String>,
    pub domain: Option<String>,
    pub server_endpoint: Option<String>,
    pub client_endpoint: Option<String>,
    pub status: Option<String>,
    pub member_id: Option<MemberId>,
    pub application_token: Option<Secret>,
}

/// An outbound event as POSTed to our handler.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundEvent {
    pub event: EventCode,
    pub event_handler_id: Option<String>,
    pub data: Value,
    pub ts: Option<i64>,
    pub auth: EventAuth,
}

/// Events documented without `auth[member_id]`: the portal is known by its domain.
const IDENTIFIED_BY_DOMAIN: &[&str] = &["ONAPPPAYMENT"];

impl InboundEvent {
    pub fn parse(body: &Value) -> Result<Self, InboundError> {
        let obj = as_object(body)?;
        let event = EventCode::parse(&required_str(obj, "event")?)?;
        let auth_value = obj.get("auth").ok_or(InboundError::Missing("auth"))?;
        let auth_obj = auth_value.as_object().ok_or(InboundError::Invalid {
            field: "auth",
            expected: "an object",
        })?;
        let auth = EventAuth {
            access_token: opt_str(auth_obj, "access_token", "auth[access_token]")?.map(Secret::new),
            refresh_token: opt_str(auth_obj, "refresh_token", "auth[refresh_token]")?
                .map(Secret::new),
            expires_in: opt_int(auth_obj, "expires_in", "auth[expires_in]")?,
            scope: opt_str(auth_obj, "scope", "auth[scope]")?,
            domain: opt_str(auth_obj, "domain", "auth[domain]")?,
            server_endpoint: opt_str(auth_obj, "server_endpoint", "auth[server_endpoint]")?,
            client_endpoint: opt_str(auth_obj, "client_endpoint", "auth[client_endpoint]")?,
            status: opt_str(auth_obj, "status", "auth[status]")?,
            member_id: opt_str(auth_obj, "member_id", "auth[member_id]")?
                .map(|m| MemberId::parse(&m))
                .transpose()?,
            application_token: opt_str(auth_obj, "application_token", "auth[application_token]")?
                .map(Secret::new),
        };
        if auth.member_id.is_none() {
            let by_domain = IDENTIFIED_BY_DOMAIN.contains(&event.as_str());
            if !by_domain || auth.domain.is_none() {
                return Err(InboundError::Missing("auth[member_id]"));
            }
        }
        let data = obj.get("data").cloned().unwrap_or(Value::Null);
        let parsed = Self {
            event_handler_id: opt_str(obj, "event_handler_id", "event_handler_id")?,
            ts: opt_int(obj, "ts", "ts")?,
            event,
            data,
            auth,
        };
        parsed.validate_data()?;
        Ok(parsed)
    }

    /// The fields a handler uses must be there and well-formed, or the event is
    /// refused at the edge rather than dead-lettered later. Only those: a 400 on a
    /// field no handler reads loses an event Bitrix24 will not resend.
    fn validate_data(&self) -> Result<(), InboundError> {
        match self.event.as_str() {
            "ONCRMDEALRECURRINGEXPOSE" => {
                DealRecurringExpose::from_data(&self.data)?;
            }
            "ONCRMREQUISITEADD" => {
                RequisiteAdd::from_data(&self.data)?;
            }
            // The installation is proved with the portal's endpoints and kept by its
            // application_token; its data (VERSION "1.0.0" and so on) is informational.
            "ONAPPINSTALL" => {
                if self.auth.application_token.is_none() {
                    return Err(InboundError::Missing("auth[application_token]"));
                }
                endpoint(
                    self.auth.client_endpoint.as_deref(),
                    "auth[client_endpoint]",
                )?;
                endpoint(
                    self.auth.server_endpoint.as_deref(),
                    "auth[server_endpoint]",
                )?;
            }
            // ONAPPPAYMENT: only the portal's identity (checked above) is used; the
            // worker asks app.info for the status, so CODE, STATUS, DAYS… are not checked.
            _ => {}
        }
        Ok(())
    }
}

/// An endpoint the worker will call: `http(s)://host…`. Whether the host may be
/// called is the worker's allowlist's decision, not the edge's.
fn endpoint(value: Option<&str>, field: &'static str) -> Result<(), InboundError> {
    let url = value.ok_or(InboundError::Missing(field))?;
    let host = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .and_then(|rest| rest.split(['/', '?', '#']).next())
        .unwrap_or_default();
    let odd = |b: u8| b.is_ascii_whitespace() || b.is_ascii_control();
    if host.is_empty() || host.bytes().any(odd) {
        return Err(InboundError::Invalid {
            field,
            expected: "an http(s) URL",
        });
    }
    Ok(())
}

/// `ONCRMDEALRECURRINGEXPOSE`: a deal was created from a recurring template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DealRecurringExpose {
    /// Row in the recurring-deal settings table (`crm.deal.recurring.get`).
    pub id: u64,
    pub recurring_deal_id: u64,
    /// The new deal (`crm.deal.get`).
    pub deal_id: u64,
}

impl DealRecurringExpose {
    pub fn from_data(data: &Value) -> Result<Self, InboundError> {
        let fields = fields(data)?;
        Ok(Self {
            id: required_id(fields, "ID", "data[FIELDS][ID]")?,
            recurring_deal_id: required_id(
                fields,
                "RECURRING_DEAL_ID",
                "data[FIELDS][RECURRING_DEAL_ID]",
            )?,
            deal_id: required_id(fields, "DEAL_ID", "data[FIELDS][DEAL_ID]")?,
        })
    }
}

/// `ONCRMREQUISITEADD`: a requisite was added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequisiteAdd {
    pub id: u64,
}

impl RequisiteAdd {
    pub fn from_data(data: &Value) -> Result<Self, InboundError> {
        Ok(Self {
            id: required_id(fields(data)?, "ID", "data[FIELDS][ID]")?,
        })
    }
}

/// `ONAPPPAYMENT`: the application was paid for. The event carries no token, so its
/// fields are only what it claims: the worker stores what `app.info` says. Hence
/// everything but `CODE` is optional and kept only when well-formed (the documented
/// VERSION is a number, installed apps send `1.0.0`; DAYS may be empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppPayment {
    pub code: String,
    pub version: Option<String>,
    pub status: Option<String>,
    pub payment_expired: Option<bool>,
    pub days: Option<i64>,
    pub language_id: Option<String>,
}

impl AppPayment {
    pub fn from_data(data: &Value) -> Result<Self, InboundError> {
        let d = data.as_object().ok_or(InboundError::Missing("data"))?;
        let text = |key: &str| d.get(key).and_then(scalar).filter(|s| !s.is_empty());
        Ok(Self {
            code: required_str_named(d, "CODE", "data[CODE]")?,
            version: text("VERSION"),
            status: text("STATUS"),
            payment_expired: match text("PAYMENT_EXPIRED").as_deref() {
                Some("Y") => Some(true),
                Some("N") => Some(false),
                _ => None,
            },
            days: text("DAYS").and_then(|s| s.trim().parse().ok()),
            language_id: text("LANGUAGE_ID"),
        })
    }
}

/// A widget call (`/placement`): the user's own short-lived tokens and the context.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementCall {
    pub domain: String,
    pub protocol: Option<String>,
    pub lang: Option<String>,
    pub app_sid: Option<String>,
    pub auth_id: Option<Secret>,
    pub auth_expires: Option<i64>,
    pub refresh_id: Option<Secret>,
    pub member_id: MemberId,
    pub status: Option<String>,
    pub placement: PlacementCode,
    /// `PLACEMENT_OPTIONS`, which arrives as a JSON string.
    pub options: Map<String, Value>,
}

impl PlacementCall {
    pub fn parse(body: &Value) -> Result<Self, InboundError> {
        let obj = as_object(body)?;
        let placement = PlacementCode::parse(&required_str(obj, "PLACEMENT")?)?;
        let options = match obj.get("PLACEMENT_OPTIONS") {
            None => Map::new(),
            Some(Value::Object(o)) => o.clone(),
            Some(Value::String(s)) if s.trim().is_empty() => Map::new(),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(o)) => o,
                // PHP's json_encode writes an empty options array as `[]`.
                Ok(Value::Array(a)) if a.is_empty() => Map::new(),
                _ => {
                    return Err(InboundError::Invalid {
                        field: "PLACEMENT_OPTIONS",
                        expected: "a JSON object",
                    })
                }
            },
            Some(_) => {
                return Err(InboundError::Invalid {
                    field: "PLACEMENT_OPTIONS",
                    expected: "a JSON object",
                })
            }
        };
        let call = Self {
            domain: required_str(obj, "DOMAIN")?,
            protocol: opt_str(obj, "PROTOCOL", "PROTOCOL")?,
            lang: opt_str(obj, "LANG", "LANG")?,
            app_sid: opt_str(obj, "APP_SID", "APP_SID")?,
            auth_id: opt_str(obj, "AUTH_ID", "AUTH_ID")?.map(Secret::new),
            auth_expires: opt_int(obj, "AUTH_EXPIRES", "AUTH_EXPIRES")?,
            refresh_id: opt_str(obj, "REFRESH_ID", "REFRESH_ID")?.map(Secret::new),
            member_id: MemberId::parse(&required_str(obj, "member_id")?)?,
            status: opt_str(obj, "status", "status")?,
            placement,
            options,
        };
        if call.crm_entity_type_id().is_some() {
            call.crm_item_id()?;
        }
        Ok(call)
    }

    /// The CRM entityTypeId behind a `CRM_…_DETAIL_ACTIVITY` placement, or `None` for
    /// placements that do not show a CRM item.
    pub fn crm_entity_type_id(&self) -> Option<u32> {
        crm_entity_type_id(self.placement.as_str())
    }

    /// `PLACEMENT_OPTIONS.ID`: the CRM item the widget was opened on.
    pub fn crm_item_id(&self) -> Result<u64, InboundError> {
        required_id(&self.options, "ID", "PLACEMENT_OPTIONS.ID")
    }
}

/// Maps a detail-activity placement to its CRM entityTypeId (see [`KnownPlacement`]).
pub fn crm_entity_type_id(placement: &str) -> Option<u32> {
    KnownPlacement::from_code(placement).map(KnownPlacement::entity_type_id)
}

/// The install page (`/install`): the installing user's tokens, before any event.
#[derive(Debug, Clone, PartialEq)]
pub struct InstallCall {
    pub domain: String,
    pub protocol: Option<String>,
    pub lang: Option<String>,
    pub app_sid: Option<String>,
    pub auth_id: Secret,
    pub auth_expires: Option<i64>,
    pub refresh_id: Secret,
    pub member_id: MemberId,
    pub status: Option<String>,
    pub server_endpoint: Option<String>,
    /// Present when the installer forwards it; otherwise `ONAPPINSTALL` brings it.
    pub application_token: Option<Secret>,
}

impl InstallCall {
    pub fn parse(body: &Value) -> Result<Self, InboundError> {
        let obj = as_object(body)?;
        Ok(Self {
            domain: required_str(obj, "DOMAIN")?,
            protocol: opt_str(obj, "PROTOCOL", "PROTOCOL")?,
            lang: opt_str(obj, "LANG", "LANG")?,
            app_sid: opt_str(obj, "APP_SID", "APP_SID")?,
            auth_id: Secret::new(required_str(obj, "AUTH_ID")?),
            auth_expires: opt_int(obj, "AUTH_EXPIRES", "AUTH_EXPIRES")?,
            refresh_id: Secret::new(required_str(obj, "REFRESH_ID")?),
            member_id: MemberId::parse(&required_str(obj, "member_id")?)?,
            status: opt_str(obj, "status", "status")?,
            server_endpoint: opt_str(obj, "SERVER_ENDPOINT", "SERVER_ENDPOINT")?,
            application_token: match opt_str(obj, "APPLICATION_TOKEN", "APPLICATION_TOKEN")? {
                Some(t) => Some(t),
                None => opt_str(obj, "application_token", "application_token")?,
            }
            .map(Secret::new),
        })
    }
}

fn as_object(v: &Value) -> Result<&Map<String, Value>, InboundError> {
    v.as_object().ok_or(InboundError::NotAnObject(json_type(v)))
}

fn fields(data: &Value) -> Result<&Map<String, Value>, InboundError> {
    data.get("FIELDS")
        .and_then(Value::as_object)
        .ok_or(InboundError::Missing("data[FIELDS]"))
}

/// A scalar as a string: strings as they are, numbers written out. Objects, arrays and
/// booleans are not scalars Bitrix24 would send here.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn opt_str(
    obj: &Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<Option<String>, InboundError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match scalar(v) {
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => Ok(Some(s)),
            None => Err(InboundError::Invalid {
                field,
                expected: "a string",
            }),
        },
    }
}

fn required_str_named(
    obj: &Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<String, InboundError> {
    opt_str(obj, key, field)?.ok_or(InboundError::Missing(field))
}

fn required_str(obj: &Map<String, Value>, key: &'static str) -> Result<String, InboundError> {
    required_str_named(obj, key, key)
}

fn opt_int(
    obj: &Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<Option<i64>, InboundError> {
    opt_str(obj, key, field)?
        .map(|s| {
            s.trim().parse::<i64>().map_err(|_| InboundError::Invalid {
                field,
                expected: "an integer",
            })
        })
        .transpose()
}

fn required_id(
    obj: &Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<u64, InboundError> {
    let s = required_str_named(obj, key, field)?;
    match s.trim().parse::<u64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(InboundError::Invalid {
            field,
            expected: "a positive integer id",
        }),
    }
}

/// Keys whose values are credentials, wherever they sit in a payload.
const SECRET_KEYS: &[&str] = &[
    "access_token",
    "refresh_token",
    "application_token",
    "AUTH_ID",
    "REFRESH_ID",
    "APPLICATION_TOKEN",
    "auth",
    "client_secret",
];

/// A copy of a payload with every credential replaced by `***`, for storing and
/// printing. (`auth` as a plain string is a token too; as an object it is walked.)
pub fn redact(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| {
                    let secret = SECRET_KEYS.contains(&k.as_str()) && !v.is_object();
                    let v = if secret && !v.is_null() {
                        Value::String("***".into())
                    } else {
                        redact(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(redact).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests;
