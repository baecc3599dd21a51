//! The REST methods the simulated portal knows, and `batch`. Each method call, alone or
//! inside a batch, goes through [`run`]: unknown method, injected failure, operating
//! budget, then the method itself (as the token's user, through the token's
//! application), whose time is added to its budget.
//!
//! Parameter names are matched exactly as each method's page spells them ([`PARAMS`]);
//! any other name is a parameter the method does not read.

use super::data;
use super::filter::{self, Filter, FilterError};
use super::params::{flag, list, param, php_decode, php_map, positive_id, text, PValue};
use super::state::{
    random_token, Caller, EventBinding, OfflineRecord, PlacementBinding, State, User,
};
use super::{ApiError, Call, CallKind};
use chrono::DateTime;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// Commands a batch runs; those beyond fail with `ERROR_BATCH_LENGTH_EXCEEDED`.
pub const MAX_BATCH: usize = 50;

/// Page size of list methods (`start` moves by it).
pub const PAGE: usize = 50;

/// Methods callable by name (`batch` is handled by the HTTP layer), with the parameter
/// names each one reads, spelled as its page in the documentation spells them.
pub const PARAMS: &[(&str, &[&str])] = &[
    // api-reference/common/system/app-info.md: no parameters.
    ("app.info", &[]),
    // api-reference/common/users/user-admin.md: no parameters.
    ("user.admin", &[]),
    // api-reference/user/user-current.md: no parameters.
    ("user.current", &[]),
    // api-reference/crm/deals/crm-deal-get.md
    ("crm.deal.get", &["id"]),
    // api-reference/crm/deals/recurring-deals/crm-deal-recurring-get.md
    ("crm.deal.recurring.get", &["id"]),
    // api-reference/crm/requisites/universal/crm-requisite-get.md
    ("crm.requisite.get", &["id"]),
    // api-reference/crm/universal/crm-item-get.md
    (
        "crm.item.get",
        &["entityTypeId", "id", "useOriginalUfNames"],
    ),
    // api-reference/crm/universal/user-defined-object-types/crm-type-list.md
    ("crm.type.list", &["order", "filter", "start"]),
    // api-reference/events/event-bind.md
    (
        "event.bind",
        &[
            "event",
            "handler",
            "auth_type",
            "event_type",
            "auth_connector",
            "options",
        ],
    ),
    // api-reference/events/event-unbind.md
    (
        "event.unbind",
        &["event", "handler", "auth_type", "event_type"],
    ),
    // api-reference/events/event-get.md: no parameters.
    ("event.get", &[]),
    // api-reference/widgets/placement-bind.md
    (
        "placement.bind",
        &[
            "PLACEMENT",
            "HANDLER",
            "TITLE",
            "DESCRIPTION",
            "GROUP_NAME",
            "LANG_ALL",
            "OPTIONS",
            "USER_ID",
        ],
    ),
    // api-reference/widgets/placement-unbind.md
    ("placement.unbind", &["PLACEMENT", "HANDLER", "USER_ID"]),
    // api-reference/widgets/placement-get.md: no parameters.
    ("placement.get", &[]),
    // api-reference/events/event-offline-get.md
    (
        "event.offline.get",
        &[
            "filter",
            "order",
            "limit",
            "clear",
            "process_id",
            "auth_connector",
            "error",
        ],
    ),
    // api-reference/events/event-offline-list.md
    (
        "event.offline.list",
        &["filter", "order", "start", "auth_connector"],
    ),
    // api-reference/events/event-offline-clear.md
    ("event.offline.clear", &["process_id", "id", "message_id"]),
    // api-reference/events/event-offline-error.md
    ("event.offline.error", &["process_id", "message_id"]),
];

/// Methods that only read and can be asked for without side effects
/// ([`super::SimPortal::expected`]).
pub const PURE: &[&str] = &[
    "app.info",
    "user.admin",
    "user.current",
    "crm.deal.get",
    "crm.deal.recurring.get",
    "crm.requisite.get",
    "crm.item.get",
    "crm.type.list",
];

/// Events `event.bind` knows: the list in api-reference/events/events.md (its
/// `ONCRMDYNAMICITEM*_147` stand for the portal's smart processes, which are added per
/// registered type). Anything else answers `ERROR_EVENT_NOT_FOUND`.
const EVENTS: &[&str] = &[
    "ONAPPUNINSTALL",
    "ONAPPINSTALL",
    "ONAPPUPDATE",
    "ONAPPPAYMENT",
    "ONAPPTEST",
    "ONAPPMETHODCONFIRM",
    "ONOFFLINEEVENT",
    "ONUSERADD",
    "ONCRMINVOICEADD",
    "ONCRMINVOICEUPDATE",
    "ONCRMINVOICEDELETE",
    "ONCRMINVOICESETSTATUS",
    "ONCRMLEADADD",
    "ONCRMLEADUPDATE",
    "ONCRMLEADDELETE",
    "ONCRMLEADUSERFIELDADD",
    "ONCRMLEADUSERFIELDUPDATE",
    "ONCRMLEADUSERFIELDDELETE",
    "ONCRMLEADUSERFIELDSETENUMVALUES",
    "ONCRMDEALADD",
    "ONCRMDEALUPDATE",
    "ONCRMDEALDELETE",
    "ONCRMDEALMOVETOCATEGORY",
    "ONCRMDEALUSERFIELDADD",
    "ONCRMDEALUSERFIELDUPDATE",
    "ONCRMDEALUSERFIELDDELETE",
    "ONCRMDEALUSERFIELDSETENUMVALUES",
    "ONCRMCOMPANYADD",
    "ONCRMCOMPANYUPDATE",
    "ONCRMCOMPANYDELETE",
    "ONCRMCOMPANYUSERFIELDADD",
    "ONCRMCOMPANYUSERFIELDUPDATE",
    "ONCRMCOMPANYUSERFIELDDELETE",
    "ONCRMCOMPANYUSERFIELDSETENUMVALUES",
    "ONCRMCONTACTADD",
    "ONCRMCONTACTUPDATE",
    "ONCRMCONTACTDELETE",
    "ONCRMCONTACTUSERFIELDADD",
    "ONCRMCONTACTUSERFIELDUPDATE",
    "ONCRMCONTACTUSERFIELDDELETE",
    "ONCRMCONTACTUSERFIELDSETENUMVALUES",
    "ONCRMQUOTEADD",
    "ONCRMQUOTEUPDATE",
    "ONCRMQUOTEDELETE",
    "ONCRMQUOTEUSERFIELDADD",
    "ONCRMQUOTEUSERFIELDUPDATE",
    "ONCRMQUOTEUSERFIELDDELETE",
    "ONCRMQUOTEUSERFIELDSETENUMVALUES",
    "ONCRMINVOICEUSERFIELDADD",
    "ONCRMINVOICEUSERFIELDUPDATE",
    "ONCRMINVOICEUSERFIELDDELETE",
    "ONCRMINVOICEUSERFIELDSETENUMVALUES",
    "ONCRMCURRENCYADD",
    "ONCRMCURRENCYUPDATE",
    "ONCRMCURRENCYDELETE",
    "ONCRMPRODUCTADD",
    "ONCRMPRODUCTUPDATE",
    "ONCRMPRODUCTDELETE",
    "ONCRMPRODUCTPROPERTYADD",
    "ONCRMPRODUCTPROPERTYUPDATE",
    "ONCRMPRODUCTPROPERTYDELETE",
    "ONCRMPRODUCTSECTIONADD",
    "ONCRMPRODUCTSECTIONUPDATE",
    "ONCRMPRODUCTSECTIONDELETE",
    "ONCRMACTIVITYADD",
    "ONCRMACTIVITYUPDATE",
    "ONCRMACTIVITYDELETE",
    "ONCRMREQUISITEADD",
    "ONCRMREQUISITEUPDATE",
    "ONCRMREQUISITEDELETE",
    "ONCRMREQUISITEUSERFIELDADD",
    "ONCRMREQUISITEUSERFIELDUPDATE",
    "ONCRMREQUISITEUSERFIELDDELETE",
    "ONCRMREQUISITEUSERFIELDSETENUMVALUES",
    "ONCRMBANKDETAILADD",
    "ONCRMBANKDETAILUPDATE",
    "ONCRMBANKDETAILDELETE",
    "ONCRMADDRESSREGISTER",
    "ONCRMADDRESSUNREGISTER",
    "ONCRMMEASUREADD",
    "ONCRMMEASUREUPDATE",
    "ONCRMMEASUREDELETE",
    "ONCRMDEALRECURRINGADD",
    "ONCRMDEALRECURRINGUPDATE",
    "ONCRMDEALRECURRINGDELETE",
    "ONCRMDEALRECURRINGEXPOSE",
    "ONCRMINVOICERECURRINGADD",
    "ONCRMINVOICERECURRINGUPDATE",
    "ONCRMINVOICERECURRINGDELETE",
    "ONCRMINVOICERECURRINGEXPOSE",
    "ONCRMTIMELINECOMMENTADD",
    "ONCRMTIMELINECOMMENTUPDATE",
    "ONCRMTIMELINECOMMENTDELETE",
    "ONCRMDYNAMICITEMADD",
    "ONCRMDYNAMICITEMUPDATE",
    "ONCRMDYNAMICITEMDELETE",
    "ONCRMTYPEADD",
    "ONCRMTYPEUPDATE",
    "ONCRMTYPEDELETE",
    "ONCRMDOCUMENTGENERATORDOCUMENTADD",
    "ONCRMDOCUMENTGENERATORDOCUMENTUPDATE",
    "ONCRMDOCUMENTGENERATORDOCUMENTDELETE",
    "ONTASKADD",
    "ONTASKUPDATE",
    "ONTASKDELETE",
    "ONTASKCOMMENTADD",
    "ONTASKCOMMENTUPDATE",
    "ONTASKCOMMENTDELETE",
];

/// The detail-activity widgets of seed 003 for the system CRM types; smart processes
/// add `CRM_DYNAMIC_<entityTypeId>_DETAIL_ACTIVITY` each.
const DETAIL_ACTIVITY: &[&str] = &[
    "CRM_LEAD_DETAIL_ACTIVITY",
    "CRM_DEAL_DETAIL_ACTIVITY",
    "CRM_CONTACT_DETAIL_ACTIVITY",
    "CRM_COMPANY_DETAIL_ACTIVITY",
    "CRM_QUOTE_DETAIL_ACTIVITY",
    "CRM_SMART_INVOICE_DETAIL_ACTIVITY",
];

fn is_method(method: &str) -> bool {
    PARAMS.iter().any(|(m, _)| *m == method)
}

/// `crm.deal.get.json` → `crm.deal.get`; Bitrix24 method names ignore case.
pub fn normalize_method(raw: &str) -> String {
    let m = raw.trim().to_ascii_lowercase();
    m.strip_suffix(".json").map(str::to_owned).unwrap_or(m)
}

/// A method's answer: `result`, and for list methods `total` and `next`.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub result: Value,
    pub total: Option<u64>,
    pub next: Option<u64>,
}

impl From<Value> for Answer {
    fn from(result: Value) -> Self {
        Self {
            result,
            total: None,
            next: None,
        }
    }
}

/// The `time` block of an answer.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub start: f64,
    pub processing: f64,
    /// `(operating_reset_at, operating)`; absent for `batch` itself, which Bitrix24
    /// does not count, and (unless switched on) in a batch's `result_time`.
    pub operating: Option<(f64, f64)>,
}

pub fn iso_unix(t: f64) -> String {
    let secs = t.floor();
    let nanos = ((t - secs) * 1e9) as u32;
    DateTime::from_timestamp(secs as i64, nanos.min(999_999_999))
        .map(|d| data::iso(d.with_timezone(&data::tz())))
        .unwrap_or_default()
}

impl Timing {
    pub fn to_json(self) -> Value {
        let finish = self.start + self.processing;
        let mut t = json!({
            "start": self.start,
            "finish": finish,
            "duration": self.processing,
            "processing": self.processing,
            "date_start": iso_unix(self.start),
            "date_finish": iso_unix(finish),
        });
        if let (Some((reset_at, operating)), Some(o)) = (self.operating, t.as_object_mut()) {
            o.insert("operating_reset_at".into(), json!(reset_at.floor() as u64));
            o.insert("operating".into(), json!(operating));
        }
        t
    }
}

/// One method call after authorization: its answer, and its timing if it ran.
pub fn run(
    state: &mut State,
    caller: &Caller,
    method: &str,
    params: &Value,
    now: Instant,
) -> (Result<Answer, ApiError>, Option<Timing>) {
    if !is_method(method) {
        return (Err(ApiError::new(404, "ERROR_METHOD_NOT_FOUND")), None);
    }
    if let Some(e) = state.take_method_failure(method) {
        return (Err(e), None);
    }
    let budget = state.cfg.operating_budget.as_secs_f64();
    if state.operating_mut(method, now).total() > budget {
        return (Err(ApiError::new(429, "OPERATION_TIME_LIMIT")), None);
    }
    let result = call(state, caller, method, params);
    let cost = state.cfg.cost_per_call.as_secs_f64();
    let op = state.operating_mut(method, now);
    op.add(now, cost);
    let (total, reset_at) = (op.total(), op.reset_at(now));
    let timing = Timing {
        start: state.unix(now),
        processing: cost,
        operating: Some((state.unix(reset_at), total)),
    };
    (result, Some(timing))
}

/// The caller's user; a token always names one that exists.
fn user_of<'a>(state: &'a State, caller: &Caller) -> Result<&'a User, ApiError> {
    state
        .user(caller.user)
        .ok_or_else(|| ApiError::new(401, "invalid_token"))
}

/// The method itself, without the budget bookkeeping.
pub fn call(
    state: &mut State,
    caller: &Caller,
    method: &str,
    p: &Value,
) -> Result<Answer, ApiError> {
    let user = user_of(state, caller)?.clone();
    // The classic CRM methods answer an empty code with the text of the documentation's
    // error table; an extranet user has no CRM permissions there, so they get the same
    // "Access denied" (the pages document no intranet-only error for them).
    let classic_access = |denied: &str| {
        if user.crm_read && user.intranet {
            Ok(())
        } else {
            Err(ApiError::with(400, "", denied))
        }
    };
    match method {
        "app.info" => {
            let app = state
                .app(&caller.client_id)
                .ok_or_else(|| ApiError::new(401, "invalid_token"))?;
            Ok(Value::Object(app.info.clone()).into())
        }
        "user.admin" => Ok(json!(user.admin).into()),
        "user.current" => Ok(data::user(&user).into()),
        "crm.deal.get" => {
            let id = positive_id(p, "id")
                .ok_or_else(|| ApiError::with(400, "", "ID is not defined or invalid."))?;
            classic_access("Access denied")?;
            found(state, method, id, "Not found")?;
            Ok(data::deal(id).into())
        }
        "crm.deal.recurring.get" => {
            let id = positive_id(p, "id")
                .ok_or_else(|| ApiError::with(400, "", "id is not defined or invalid"))?;
            classic_access("Access denied")?;
            found(state, method, id, "Recurring deal is not found.")?;
            Ok(data::recurring(id).into())
        }
        "crm.requisite.get" => {
            let id = positive_id(p, "id")
                .ok_or_else(|| ApiError::with(400, "", "ID is not defined or invalid."))?;
            classic_access("Access denied.")?;
            found(
                state,
                method,
                id,
                &format!("The Requisite with ID '{id}' is not found"),
            )?;
            Ok(data::requisite(id).into())
        }
        "crm.item.get" => item_get(state, &user, method, p),
        "crm.type.list" => type_list(state, &user, p),
        "event.bind" => event_bind(state, caller, &user, p),
        "event.unbind" => event_unbind(state, caller, &user, p),
        "event.get" => Ok(Value::Array(
            state
                .events
                .iter()
                .filter(|b| b.client_id == caller.client_id)
                // A user without administrator rights sees only the handlers
                // registered for them (api-reference/events/event-get.md).
                .filter(|b| user.admin || b.auth_type == user.id.to_string())
                .map(|b| {
                    if b.offline {
                        json!({ "event": b.event, "connector_id": b.auth_connector, "offline": 1 })
                    } else {
                        json!({ "event": b.event, "handler": b.handler, "auth_type": b.auth_type, "offline": 0 })
                    }
                })
                .collect(),
        )
        .into()),
        "placement.bind" => {
            admin_only(&user)?;
            placement_bind(state, caller, p)
        }
        "placement.unbind" => {
            admin_only(&user)?;
            placement_unbind(state, caller, p)
        }
        "placement.get" => {
            admin_only(&user)?;
            Ok(Value::Array(
                state
                    .placements
                    .iter()
                    .filter(|b| b.client_id == caller.client_id)
                    .map(|b| {
                        json!({
                            "placement": b.placement,
                            "userId": b.user_id,
                            "handler": b.handler,
                            "options": b.options,
                            "title": b.title,
                            "description": b.description,
                            "langAll": b.lang_all,
                        })
                    })
                    .collect(),
            )
            .into())
        }
        "event.offline.get" => {
            admin_only(&user)?;
            offline_get(state, caller, p)
        }
        "event.offline.list" => {
            admin_only(&user)?;
            offline_list(state, caller, p)
        }
        "event.offline.clear" => {
            admin_only(&user)?;
            let pid = required(p, "process_id")?;
            let ids = list(p, "id");
            let message_ids = list(p, "message_id");
            state.offline.retain(|r| {
                // `message_id` is ignored when `id` is given
                // (api-reference/events/event-offline-clear.md).
                let chosen = if !ids.is_empty() {
                    ids.contains(&r.id.to_string())
                } else {
                    message_ids.is_empty() || message_ids.contains(&r.message_id)
                };
                !(r.client_id == caller.client_id && r.process_id == pid && chosen)
            });
            Ok(json!(true).into())
        }
        "event.offline.error" => {
            admin_only(&user)?;
            let pid = required(p, "process_id")?;
            let message_ids = list(p, "message_id");
            for r in state.offline.iter_mut().filter(|r| {
                r.client_id == caller.client_id
                    && r.process_id == pid
                    && message_ids.contains(&r.message_id)
            }) {
                r.error = true;
                r.process_id.clear();
            }
            Ok(json!(true).into())
        }
        _ => Err(ApiError::new(404, "ERROR_METHOD_NOT_FOUND")),
    }
}

/// Methods for administrators only answer others 403 `ACCESS_DENIED` "Access denied!"
/// (api-reference/events/event-offline-get.md, api-reference/widgets/placement-unbind.md;
/// placement.bind and placement.get say "Who can execute the method: administrator"
/// without an error row, so they answer the same).
fn admin_only(user: &User) -> Result<(), ApiError> {
    if user.admin {
        Ok(())
    } else {
        Err(ApiError::with(403, "ACCESS_DENIED", "Access denied!"))
    }
}

fn found(state: &State, method: &str, id: u64, message: &str) -> Result<(), ApiError> {
    if state.missing.contains(&(method.to_owned(), id)) {
        return Err(ApiError::with(400, "", message));
    }
    Ok(())
}

fn required(p: &Value, name: &str) -> Result<String, ApiError> {
    text(p, name)
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| missing_argument(400, name))
}

fn missing_argument(status: u16, name: &str) -> ApiError {
    ApiError {
        argument: Some(name.to_owned()),
        ..ApiError::with(
            status,
            "ERROR_ARGUMENT",
            &format!("Argument '{name}' is null or empty"),
        )
    }
}

fn filter_error(e: FilterError) -> ApiError {
    let description = match e {
        FilterError::Field(f) => format!("Invalid filter: field '{f}' is not allowed in filter"),
        FilterError::Value(v) => format!("Invalid filter: '{v}' has invalid value"),
        FilterError::Direction { field, got } => format!(
            "Invalid order: allowed sort directions are ASC, DESC. But got '{got}' for field '{field}'"
        ),
        FilterError::Unsupported(k) => {
            format!("Invalid filter: '{k}' (nested filters are not supported by the simulator)")
        }
    };
    ApiError::with(400, "INVALID_ARG_VALUE", &description)
}

/// `crm.item.get` in the order its checks run (api-reference/crm/universal/crm-item-get.md):
/// intranet users only (403 `allowed_only_intranet_user`), the type must exist
/// (`NOT_FOUND` "SPA not found"), the user must read that type (400 `ACCESS_DENIED`),
/// the item must exist (`NOT_FOUND`).
fn item_get(state: &State, user: &User, method: &str, p: &Value) -> Result<Answer, ApiError> {
    if !user.intranet {
        return Err(ApiError::with(
            403,
            "allowed_only_intranet_user",
            "Action is allowed only to intranet users",
        ));
    }
    let et = positive_id(p, "entityTypeId")
        .filter(|&t| data::system_entity_type(t) || state.smart_process_exists(t))
        .ok_or_else(|| ApiError::with(400, "NOT_FOUND", "SPA not found"))?;
    if !user.crm_read {
        return Err(ApiError::with(
            400,
            "ACCESS_DENIED",
            "You do not have permission to view this item",
        ));
    }
    let not_found = || ApiError::with(400, "NOT_FOUND", "Element not found");
    let id = positive_id(p, "id").ok_or_else(not_found)?;
    if state.missing.contains(&(method.to_owned(), id)) {
        return Err(not_found());
    }
    Ok(data::item(et, id).into())
}

/// `crm.type.list` (api-reference/crm/universal/user-defined-object-types/crm-type-list.md):
/// for intranet users with administrative access to CRM (here: portal administrators),
/// 50 per page, `{"types": [...]}` with `total` and `next`.
fn type_list(state: &State, user: &User, p: &Value) -> Result<Answer, ApiError> {
    if !user.intranet {
        return Err(ApiError::with(
            403,
            "allowed_only_intranet_user",
            "Action allowed only for intranet users",
        ));
    }
    if !user.admin {
        return Err(ApiError::with(400, "ACCESS_DENIED", "Access denied"));
    }
    let fields = data::TYPE_FIELDS;
    let filter = Filter::parse(param(p, "filter"), fields).map_err(filter_error)?;
    let mut types: Vec<Map<String, Value>> = state
        .smart_processes
        .iter()
        .map(|t| data::smart_process_type(t.id, t.entity_type_id, &t.title, &t.created))
        .filter_map(|v| v.as_object().cloned())
        .filter(|t| filter.matches(t))
        .collect();
    filter::sort(&mut types, param(p, "order"), fields, &[("id", false)]).map_err(filter_error)?;
    let (page, total, next) = paginate(types, p);
    Ok(Answer {
        result: json!({ "types": page }),
        total: Some(total),
        next,
    })
}

fn paginate(items: Vec<Map<String, Value>>, p: &Value) -> (Vec<Value>, u64, Option<u64>) {
    let total = items.len();
    let start = positive_id(p, "start").unwrap_or(0) as usize;
    let page: Vec<Value> = items
        .into_iter()
        .skip(start)
        .take(PAGE)
        .map(Value::Object)
        .collect();
    let next = (start + PAGE < total).then_some((start + PAGE) as u64);
    (page, total as u64, next)
}

fn is_offline(p: &Value) -> bool {
    text(p, "event_type").is_some_and(|t| t.trim().eq_ignore_ascii_case("offline"))
}

/// Events known on this portal: the documented list and one set per smart process.
fn event_exists(state: &State, event: &str) -> bool {
    if EVENTS.contains(&event) {
        return true;
    }
    [
        "ONCRMDYNAMICITEMADD_",
        "ONCRMDYNAMICITEMUPDATE_",
        "ONCRMDYNAMICITEMDELETE_",
    ]
    .iter()
    .filter_map(|prefix| event.strip_prefix(prefix))
    .filter_map(|n| n.parse::<u64>().ok())
    .any(|t| state.smart_process_exists(t))
}

/// `event.bind` (api-reference/events/event-bind.md): any user, but a user without
/// administrator rights may not bind offline events, and their handlers are bound on
/// their own behalf (`auth_type` = their id; another user's id is refused).
fn event_bind(
    state: &mut State,
    caller: &Caller,
    user: &User,
    p: &Value,
) -> Result<Answer, ApiError> {
    let event = required(p, "event")?.to_ascii_uppercase();
    if !event_exists(state, &event) {
        return Err(ApiError::with(
            400,
            "ERROR_EVENT_NOT_FOUND",
            "Event not found",
        ));
    }
    let offline = is_offline(p);
    if offline && !user.admin {
        return Err(ApiError::with(
            403,
            "ACCESS_DENIED",
            "Access denied! Offline events binding requires administrator access rights",
        ));
    }
    // An offline binding has no handler: "do not provide handler" (offline-events.md).
    let handler = if offline {
        String::new()
    } else {
        required(p, "handler")?
    };
    let given = text(p, "auth_type")
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty());
    let auth_type =
        match given {
            Some(a) if !user.admin && a != user.id.to_string() => return Err(ApiError::with(
                403,
                "ACCESS_DENIED",
                "Access denied! Event binding with AUTH_TYPE requires administrator access rights",
            )),
            Some(a) => a,
            None if user.admin => "0".into(),
            None => user.id.to_string(),
        };
    let auth_connector = text(p, "auth_connector").unwrap_or_default();
    let duplicate = state.events.iter().any(|b| {
        b.client_id == caller.client_id
            && b.event == event
            && b.offline == offline
            && b.handler == handler
            && b.auth_type == auth_type
            && b.auth_connector == auth_connector
    });
    if duplicate {
        return Err(ApiError::with(400, "ERROR_CORE", "Handler already binded"));
    }
    let id = state.next_binding_id();
    state.events.push(EventBinding {
        id,
        client_id: caller.client_id.clone(),
        event,
        handler,
        auth_type,
        offline,
        auth_connector,
        options: param(p, "options").cloned().unwrap_or(Value::Null),
    });
    Ok(json!(true).into())
}

/// `event.unbind` (api-reference/events/event-unbind.md): without parameters it removes
/// every handler that meets the other conditions; users without administrator rights
/// remove only their own online handlers.
fn event_unbind(
    state: &mut State,
    caller: &Caller,
    user: &User,
    p: &Value,
) -> Result<Answer, ApiError> {
    let event = text(p, "event")
        .unwrap_or_default()
        .trim()
        .to_ascii_uppercase();
    let handler = text(p, "handler").filter(|h| !h.is_empty());
    let offline = is_offline(p);
    // "specify auth_type=0 or an empty value" for handlers bound without a user.
    let auth_type = text(p, "auth_type").map(|a| {
        let a = a.trim().to_owned();
        if a.is_empty() {
            "0".to_owned()
        } else {
            a
        }
    });
    if !user.admin {
        if offline {
            return Err(ApiError::with(
                403,
                "ACCESS_DENIED",
                "Access denied! Offline events unbinding requires administrator access rights",
            ));
        }
        if auth_type
            .as_ref()
            .is_some_and(|a| *a != user.id.to_string())
        {
            return Err(ApiError::with(
                403,
                "ACCESS_DENIED",
                "Access denied! Event unbinding with AUTH_TYPE requires administrator access rights",
            ));
        }
    }
    let own = user.id.to_string();
    let before = state.events.len();
    state.events.retain(|b| {
        let chosen = b.client_id == caller.client_id
            && b.offline == offline
            && (event.is_empty() || b.event == event)
            && handler.as_ref().is_none_or(|h| *h == b.handler)
            && auth_type.as_ref().is_none_or(|a| *a == b.auth_type)
            && (user.admin || b.auth_type == own);
        !chosen
    });
    Ok(json!({ "count": before - state.events.len() }).into())
}

/// Is `placement` a widget this portal has? Detail-activity widgets exist for the
/// system types and for each smart process; other codes are taken on trust.
fn placement_exists(state: &State, placement: &str) -> bool {
    if let Some(rest) = placement.strip_prefix("CRM_DYNAMIC_") {
        return rest
            .split('_')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|t| state.smart_process_exists(t));
    }
    if placement.starts_with("CRM_") && placement.ends_with("_DETAIL_ACTIVITY") {
        return DETAIL_ACTIVITY.contains(&placement);
    }
    true
}

/// `placement.bind` (api-reference/widgets/placement-bind.md). Its page documents
/// `ERROR_ARGUMENT`, `ERROR_PLACEMENT_USER_MODE`, `ERROR_PLACEMENT_MAX_COUNT` and
/// `EMPTY_ERROR_HANDLER_URL` as arriving with HTTP **200**; an unknown code is
/// `ERROR_PLACEMENT_NOT_FOUND` (the widget pages' troubleshooting rows; no status is
/// given, so 400 like the page's other errors).
fn placement_bind(state: &mut State, caller: &Caller, p: &Value) -> Result<Answer, ApiError> {
    let arg = |name: &str| {
        text(p, name)
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing_argument(200, name))
    };
    let placement = arg("PLACEMENT")?.to_ascii_uppercase();
    let handler = arg("HANDLER")?;
    if !placement_exists(state, &placement) {
        return Err(ApiError::with(
            400,
            "ERROR_PLACEMENT_NOT_FOUND",
            "Placement not found",
        ));
    }
    let user_id = positive_id(p, "USER_ID").unwrap_or(0);
    let single = ["PAGE_BACKGROUND_WORKER", "REST_APP_URI"];
    if user_id != 0 && placement != "PAGE_BACKGROUND_WORKER" {
        return Err(ApiError::with(
            200,
            "ERROR_PLACEMENT_USER_MODE",
            "User mode is not available",
        ));
    }
    let options = param(p, "OPTIONS")
        .filter(|o| o.is_object())
        .cloned()
        .unwrap_or_else(|| json!([]));
    if placement == "PAGE_BACKGROUND_WORKER"
        && options
            .get("errorHandlerUrl")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        return Err(ApiError::with(
            200,
            "EMPTY_ERROR_HANDLER_URL",
            "Error handler URL is empty",
        ));
    }
    let mine = |b: &&PlacementBinding| b.client_id == caller.client_id && b.placement == placement;
    if single.contains(&placement.as_str()) && state.placements.iter().any(|b| mine(&b)) {
        return Err(ApiError::with(
            200,
            "ERROR_PLACEMENT_MAX_COUNT",
            "Placement handlers count exceeded",
        ));
    }
    if state
        .placements
        .iter()
        .filter(mine)
        .any(|b| b.handler == handler && b.user_id == user_id)
    {
        return Err(ApiError::with(
            400,
            "ERROR_CORE",
            "Unable to set placement handler: Handler already binded",
        ));
    }
    state.placements.push(PlacementBinding {
        client_id: caller.client_id.clone(),
        placement,
        handler,
        title: text(p, "TITLE").unwrap_or_default(),
        description: text(p, "DESCRIPTION").unwrap_or_default(),
        options,
        lang_all: param(p, "LANG_ALL")
            .filter(|o| o.is_object())
            .cloned()
            .unwrap_or_else(|| json!([])),
        user_id,
    });
    Ok(json!(true).into())
}

/// `placement.unbind` (api-reference/widgets/placement-unbind.md). Its `count` "increments
/// by 1 for each found handler record before the removal call, by another 1 after each
/// successful removal": two per handler removed.
fn placement_unbind(state: &mut State, caller: &Caller, p: &Value) -> Result<Answer, ApiError> {
    let placement = match param(p, "PLACEMENT") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_ascii_uppercase(),
        Some(Value::Object(_) | Value::Array(_)) => {
            return Err(ApiError {
                argument: Some("PLACEMENT".into()),
                ..ApiError::with(
                    400,
                    "ERROR_ARGUMENT",
                    "The value of an argument 'PLACEMENT' must be of type string",
                )
            })
        }
        _ => return Err(missing_argument(400, "PLACEMENT")),
    };
    let handler = text(p, "HANDLER").filter(|h| !h.is_empty());
    let user_id = positive_id(p, "USER_ID");
    let before = state.placements.len();
    state.placements.retain(|b| {
        !(b.client_id == caller.client_id
            && b.placement == placement
            && handler.as_ref().is_none_or(|h| *h == b.handler)
            && user_id.is_none_or(|u| u == b.user_id))
    });
    let removed = before - state.placements.len();
    Ok(json!({ "count": 2 * removed }).into())
}

/// Fields `event.offline.get` filters and sorts by.
const OFFLINE_GET_FIELDS: &[&str] = &["ID", "TIMESTAMP_X", "EVENT_NAME", "MESSAGE_ID"];
/// `event.offline.list` adds `PROCESS_ID` and `ERROR`.
const OFFLINE_LIST_FIELDS: &[&str] = &[
    "ID",
    "TIMESTAMP_X",
    "EVENT_NAME",
    "MESSAGE_ID",
    "PROCESS_ID",
    "ERROR",
];

/// The order of records as the method would sort them: `order` over the documented
/// fields, then by arrival (records with equal `TIMESTAMP_X` keep their order).
fn ordered(
    records: Vec<&OfflineRecord>,
    order: Option<&Value>,
    fields: &[&str],
    default: &[(&str, bool)],
) -> Result<Vec<OfflineRecord>, ApiError> {
    let mut rows: Vec<Map<String, Value>> = records
        .iter()
        .map(|r| {
            let mut m = r.to_list_json().as_object().cloned().unwrap_or_default();
            // Hidden sort keys: arrival, for ties and for TIMESTAMP_X's one-second grain.
            m.insert("__seq".into(), json!(r.seq));
            m.insert("__id".into(), json!(r.id));
            m
        })
        .collect();
    let mut keys: Vec<&str> = fields.to_vec();
    keys.push("__seq");
    let order = match order {
        Some(Value::Object(o)) if !o.is_empty() => {
            let mut o = o.clone();
            if o.contains_key("TIMESTAMP_X") {
                let dir = o.get("TIMESTAMP_X").cloned().unwrap_or(json!("ASC"));
                o.insert("__seq".into(), dir);
            }
            Some(Value::Object(o))
        }
        _ => None,
    };
    for k in order
        .as_ref()
        .and_then(Value::as_object)
        .map(|o| o.keys().cloned().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        if k != "__seq" && !fields.contains(&k.as_str()) {
            return Err(filter_error(FilterError::Field(k)));
        }
    }
    filter::sort(&mut rows, order.as_ref(), &keys, default).map_err(filter_error)?;
    let by_id: std::collections::HashMap<u64, &OfflineRecord> =
        records.iter().map(|r| (r.id, *r)).collect();
    Ok(rows
        .iter()
        .filter_map(|m| m.get("__id").and_then(Value::as_u64))
        .filter_map(|id| by_id.get(&id).map(|r| (*r).clone()))
        .collect())
}

/// `event.offline.get` (api-reference/events/event-offline-get.md): `clear=1` (the
/// default) hands records out and deletes them; `clear=0` reserves them under a
/// `process_id` and hides them from other readers until `event.offline.clear`; a known
/// `process_id` gets its reserved records again. Records come from the queue of the
/// caller's application and of the given `auth_connector` (none: records without a
/// source, offline-events.md).
fn offline_get(state: &mut State, caller: &Caller, p: &Value) -> Result<Answer, ApiError> {
    let limit = positive_id(p, "limit").map_or(50, |l| l.min(1000) as usize);
    let clear = flag(p, "clear", true);
    let error = flag(p, "error", false);
    let connector = text(p, "auth_connector").unwrap_or_default();
    let filter = Filter::parse(param(p, "filter"), OFFLINE_GET_FIELDS).map_err(filter_error)?;
    let pid = text(p, "process_id")
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(random_token);

    let held = state
        .offline
        .iter()
        .filter(|r| r.client_id == caller.client_id && r.process_id == pid)
        .count();
    let free: Vec<&OfflineRecord> = state
        .offline
        .iter()
        .filter(|r| {
            r.client_id == caller.client_id
                && r.connector == connector
                && r.process_id.is_empty()
                && r.error == error
                && r.to_list_json()
                    .as_object()
                    .is_some_and(|m| filter.matches(m))
        })
        .collect();
    let free = ordered(
        free,
        param(p, "order"),
        OFFLINE_GET_FIELDS,
        &[("TIMESTAMP_X", false), ("__seq", false)],
    )?;
    let take: Vec<u64> = free
        .iter()
        .take(limit.saturating_sub(held))
        .map(|r| r.id)
        .collect();
    for r in state.offline.iter_mut().filter(|r| take.contains(&r.id)) {
        r.process_id = pid.clone();
    }

    let mine: Vec<&OfflineRecord> = state
        .offline
        .iter()
        .filter(|r| r.client_id == caller.client_id && r.process_id == pid)
        .collect();
    let mut chosen = ordered(
        mine,
        param(p, "order"),
        OFFLINE_GET_FIELDS,
        &[("TIMESTAMP_X", false), ("__seq", false)],
    )?;
    chosen.truncate(limit);
    if clear {
        let ids: Vec<u64> = chosen.iter().map(|r| r.id).collect();
        state.offline.retain(|r| !ids.contains(&r.id));
        // Records of this process past the limit go back to the queue.
        for r in state
            .offline
            .iter_mut()
            .filter(|r| r.client_id == caller.client_id && r.process_id == pid)
        {
            r.process_id.clear();
        }
    }
    Ok(json!({
        "process_id": if clear { Value::Null } else { json!(pid) },
        "events": chosen.iter().map(OfflineRecord::to_json).collect::<Vec<_>>(),
    })
    .into())
}

/// `event.offline.list` (api-reference/events/event-offline-list.md): the queue without
/// changing it, 50 per page, by `ID` unless ordered otherwise.
fn offline_list(state: &State, caller: &Caller, p: &Value) -> Result<Answer, ApiError> {
    let connector = text(p, "auth_connector").unwrap_or_default();
    let filter = Filter::parse(param(p, "filter"), OFFLINE_LIST_FIELDS).map_err(filter_error)?;
    let records: Vec<&OfflineRecord> = state
        .offline
        .iter()
        .filter(|r| {
            r.client_id == caller.client_id
                && r.connector == connector
                && r.to_list_json()
                    .as_object()
                    .is_some_and(|m| filter.matches(m))
        })
        .collect();
    let records = ordered(
        records,
        param(p, "order"),
        OFFLINE_LIST_FIELDS,
        &[("ID", false)],
    )?;
    let rows: Vec<Map<String, Value>> = records
        .iter()
        .filter_map(|r| r.to_list_json().as_object().cloned())
        .collect();
    let (page, total, next) = paginate(rows, p);
    Ok(Answer {
        result: Value::Array(page),
        total: Some(total),
        next,
    })
}

/// What a batch produced: the answer's `result` and a record per command.
pub struct BatchOutcome {
    pub result: Value,
    pub calls: Vec<Call>,
    pub processing: f64,
}

/// `batch` (settings/how-to-call-rest-api/batch.md): each command runs like a call of
/// its own with the batch's token; its answer goes under its key in `result` or
/// `result_error`, list methods add `result_total` and `result_next`; `halt` stops at
/// the first error. Empty maps are written `[]`, as PHP writes them. The documentation's
/// `result_time` entries carry no `operating`/`operating_reset_at`
/// ([`super::PortalConfig::batch_operating`] adds them).
pub fn batch(
    state: &mut State,
    caller: &Caller,
    cmd: Vec<(String, PValue)>,
    halt: bool,
    token: &str,
    now: Instant,
) -> BatchOutcome {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    let mut totals = Vec::new();
    let mut nexts = Vec::new();
    let mut times = Vec::new();
    let mut calls = Vec::new();
    let mut processing = 0.0;
    let with_operating = state.cfg.batch_operating;
    for (i, (key, command)) in cmd.into_iter().enumerate() {
        let line = command.as_text().unwrap_or_default();
        let (raw_method, query) = line.split_once('?').unwrap_or((line.as_str(), ""));
        let method = normalize_method(raw_method);
        let mut params = php_decode(query);
        params.remove("auth");
        let params = params.to_json();
        let (result, timing) = if i >= MAX_BATCH {
            (Err(ApiError::new(400, "ERROR_BATCH_LENGTH_EXCEEDED")), None)
        } else if method == "batch" {
            (
                Err(ApiError::new(405, "ERROR_BATCH_METHOD_NOT_ALLOWED")),
                None,
            )
        } else {
            run(state, caller, &method, &params, now)
        };
        if let Some(mut t) = timing {
            processing += t.processing;
            if !with_operating {
                t.operating = None;
            }
            times.push((key.clone(), t.to_json()));
        }
        calls.push(Call {
            kind: CallKind::BatchCommand,
            method,
            status: result.as_ref().map_or_else(|e| e.status, |_| 200),
            error: result.as_ref().err().map(|e| e.code.clone()),
            token: Some(token.to_owned()),
            params,
            batch_size: None,
            at: now,
        });
        match result {
            Ok(a) => {
                if let Some(t) = a.total {
                    totals.push((key.clone(), json!(t)));
                }
                if let Some(n) = a.next {
                    nexts.push((key.clone(), json!(n)));
                }
                ok.push((key, a.result));
            }
            Err(e) => {
                errors.push((key, e.body()));
                if halt {
                    break;
                }
            }
        }
    }
    let result = json!({
        "result": php_map(ok),
        "result_error": php_map(errors),
        "result_total": php_map(totals),
        "result_next": php_map(nexts),
        "result_time": php_map(times),
    });
    BatchOutcome {
        result,
        calls,
        processing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_lists_its_parameters_once() {
        for (m, names) in PARAMS {
            let mut sorted = names.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), names.len(), "{m}");
            assert_eq!(normalize_method(m), *m);
        }
        for m in PURE {
            assert!(is_method(m), "{m}");
        }
    }
}
