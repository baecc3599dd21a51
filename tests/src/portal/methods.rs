//! The REST methods the simulated portal knows, and `batch`. Each method call, alone or
//! inside a batch, goes through [`run`]: unknown method, injected failure, operating
//! budget, then the method itself, whose time is added to its budget.

use super::data;
use super::params::{flag, list, param, php_decode, php_map, positive_id, text, PValue};
use super::state::{random_token, EventBinding, OfflineRecord, PlacementBinding, State};
use super::{ApiError, Call, CallKind};
use chrono::DateTime;
use serde_json::{json, Value};
use std::time::Instant;

/// Commands a batch runs; those beyond fail with `ERROR_BATCH_LENGTH_EXCEEDED`.
pub const MAX_BATCH: usize = 50;

/// Methods callable by name (`batch` is handled by the HTTP layer).
const METHODS: &[&str] = &[
    "app.info",
    "crm.deal.get",
    "crm.deal.recurring.get",
    "crm.requisite.get",
    "crm.item.get",
    "event.bind",
    "event.unbind",
    "event.get",
    "placement.bind",
    "placement.unbind",
    "placement.get",
    "event.offline.get",
    "event.offline.clear",
    "event.offline.error",
];

/// Methods that only read and can be asked for without side effects
/// ([`super::SimPortal::expected`]).
pub const PURE: &[&str] = &[
    "app.info",
    "crm.deal.get",
    "crm.deal.recurring.get",
    "crm.requisite.get",
    "crm.item.get",
];

/// `crm.deal.get.json` → `crm.deal.get`; Bitrix24 method names ignore case.
pub fn normalize_method(raw: &str) -> String {
    let m = raw.trim().to_ascii_lowercase();
    m.strip_suffix(".json").map(str::to_owned).unwrap_or(m)
}

/// The `time` block of an answer.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub start: f64,
    pub processing: f64,
    /// `(operating_reset_at, operating)`; absent for `batch` itself, which Bitrix24
    /// does not count.
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
    method: &str,
    params: &Value,
    now: Instant,
) -> (Result<Value, ApiError>, Option<Timing>) {
    if !METHODS.contains(&method) {
        return (Err(ApiError::new(404, "ERROR_METHOD_NOT_FOUND")), None);
    }
    if let Some(e) = state.take_method_failure(method) {
        return (Err(e), None);
    }
    let budget = state.cfg.operating_budget.as_secs_f64();
    if state.operating_mut(method, now).total() > budget {
        return (Err(ApiError::new(429, "OPERATION_TIME_LIMIT")), None);
    }
    let result = call(state, method, params);
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

/// The method itself, without the budget bookkeeping.
pub fn call(state: &mut State, method: &str, p: &Value) -> Result<Value, ApiError> {
    match method {
        "app.info" => Ok(Value::Object(state.app_info.clone())),
        "crm.deal.get" => {
            let id = positive_id(p, "id").ok_or_else(|| ApiError::with(400, "", "ID is not defined or invalid."))?;
            found(state, method, id, "Not found")?;
            Ok(data::deal(id))
        }
        "crm.deal.recurring.get" => {
            let id = positive_id(p, "id").ok_or_else(|| ApiError::with(400, "", "id is not defined or invalid"))?;
            found(state, method, id, "Recurring deal is not found.")?;
            Ok(data::recurring(id))
        }
        "crm.requisite.get" => {
            let id = positive_id(p, "id").ok_or_else(|| ApiError::with(400, "", "ID is not defined or invalid."))?;
            found(state, method, id, &format!("The Requisite with ID '{id}' is not found"))?;
            Ok(data::requisite(id))
        }
        "crm.item.get" => {
            let et = positive_id(p, "entityTypeId")
                .filter(|&t| data::entity_type_exists(t))
                .ok_or_else(|| ApiError::with(400, "NOT_FOUND", "SPA not found"))?;
            let not_found = || ApiError::with(400, "NOT_FOUND", "Element not found");
            let id = positive_id(p, "id").ok_or_else(not_found)?;
            if state.missing.contains(&(method.to_owned(), id)) {
                return Err(not_found());
            }
            Ok(data::item(et, id))
        }
        "event.bind" => event_bind(state, p),
        "event.unbind" => {
            let event = text(p, "event").unwrap_or_default().trim().to_ascii_uppercase();
            let handler = text(p, "handler").filter(|h| !h.is_empty());
            let offline = is_offline(p);
            let before = state.events.len();
            state.events.retain(|b| {
                !(b.event == event && b.offline == offline && handler.as_ref().is_none_or(|h| *h == b.handler))
            });
            Ok(json!({ "count": before - state.events.len() }))
        }
        "event.get" => Ok(Value::Array(
            state
                .events
                .iter()
                .map(|b| {
                    if b.offline {
                        json!({ "event": b.event, "connector_id": b.auth_connector, "offline": 1 })
                    } else {
                        json!({ "event": b.event, "handler": b.handler, "auth_type": b.auth_type, "offline": 0 })
                    }
                })
                .collect(),
        )),
        "placement.bind" => placement_bind(state, p),
        "placement.unbind" => {
            let placement = required(p, "PLACEMENT")?.to_ascii_uppercase();
            let handler = text(p, "HANDLER").filter(|h| !h.is_empty());
            let before = state.placements.len();
            state
                .placements
                .retain(|b| !(b.placement == placement && handler.as_ref().is_none_or(|h| *h == b.handler)));
            Ok(json!({ "count": before - state.placements.len() }))
        }
        "placement.get" => Ok(Value::Array(
            state
                .placements
                .iter()
                .map(|b| {
                    json!({
                        "placement": b.placement,
                        "userId": 0,
                        "handler": b.handler,
                        "options": b.options,
                        "title": b.title,
                        "description": b.description,
                        "langAll": [],
                    })
                })
                .collect(),
        )),
        "event.offline.get" => Ok(offline_get(state, p)),
        "event.offline.clear" => {
            let pid = required(p, "process_id")?;
            let ids = list(p, "id");
            let message_ids = list(p, "message_id");
            state.offline.retain(|r| {
                let chosen = if !ids.is_empty() {
                    ids.contains(&r.id.to_string())
                } else {
                    message_ids.is_empty() || message_ids.contains(&r.message_id)
                };
                !(r.process_id == pid && chosen)
            });
            Ok(json!(true))
        }
        "event.offline.error" => {
            let pid = required(p, "process_id")?;
            let message_ids = list(p, "message_id");
            for r in state.offline.iter_mut().filter(|r| r.process_id == pid && message_ids.contains(&r.message_id)) {
                r.error = true;
                r.process_id.clear();
            }
            Ok(json!(true))
        }
        _ => Err(ApiError::new(404, "ERROR_METHOD_NOT_FOUND")),
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
        .ok_or_else(|| {
            ApiError::with(
                400,
                "ERROR_ARGUMENT",
                &format!("Argument '{name}' is null or empty"),
            )
        })
}

fn is_offline(p: &Value) -> bool {
    text(p, "event_type").is_some_and(|t| t.trim().eq_ignore_ascii_case("offline"))
}

fn event_bind(state: &mut State, p: &Value) -> Result<Value, ApiError> {
    let event = required(p, "EVENT")?.to_ascii_uppercase();
    let offline = is_offline(p);
    let handler = if offline {
        text(p, "handler").unwrap_or_default()
    } else {
        required(p, "HANDLER")?
    };
    if !event.starts_with("ON") {
        return Err(ApiError::with(
            400,
            "ERROR_EVENT_NOT_FOUND",
            "Event not found",
        ));
    }
    let auth_type = text(p, "auth_type")
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "0".into());
    let binding = EventBinding {
        event,
        handler,
        auth_type,
        offline,
        auth_connector: text(p, "auth_connector").unwrap_or_default(),
    };
    let duplicate = state.events.iter().any(|b| {
        b.event == binding.event
            && b.offline == binding.offline
            && b.handler == binding.handler
            && b.auth_type == binding.auth_type
            && b.auth_connector == binding.auth_connector
    });
    if duplicate {
        return Err(ApiError::with(400, "ERROR_CORE", "Handler already binded"));
    }
    state.events.push(binding);
    Ok(json!(true))
}

fn placement_bind(state: &mut State, p: &Value) -> Result<Value, ApiError> {
    let placement = required(p, "PLACEMENT")?.to_ascii_uppercase();
    let handler = required(p, "HANDLER")?;
    if state
        .placements
        .iter()
        .any(|b| b.placement == placement && b.handler == handler)
    {
        return Err(ApiError::with(
            400,
            "ERROR_CORE",
            "Unable to set placement handler: Handler already binded",
        ));
    }
    state.placements.push(PlacementBinding {
        placement,
        handler,
        title: text(p, "TITLE").unwrap_or_default(),
        description: text(p, "DESCRIPTION").unwrap_or_default(),
        options: param(p, "OPTIONS")
            .filter(|o| o.is_object())
            .cloned()
            .unwrap_or_else(|| json!([])),
    });
    Ok(json!(true))
}

/// `event.offline.get`: `clear=1` (the default) hands records out and deletes them;
/// `clear=0` reserves them under a `process_id` and hides them from other readers
/// until `event.offline.clear`; a known `process_id` gets its reserved records again.
fn offline_get(state: &mut State, p: &Value) -> Value {
    let limit = positive_id(p, "limit").map_or(50, |l| l.min(1000) as usize);
    let clear = flag(p, "clear", true);
    let error = flag(p, "error", false);
    let pid = text(p, "process_id")
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(random_token);

    let held = state.offline.iter().filter(|r| r.process_id == pid).count();
    let mut free: Vec<usize> = (0..state.offline.len())
        .filter(|&i| state.offline[i].process_id.is_empty() && state.offline[i].error == error)
        .collect();
    free.sort_by_key(|&i| (state.offline[i].seq, state.offline[i].id));
    for i in free.into_iter().take(limit.saturating_sub(held)) {
        state.offline[i].process_id = pid.clone();
    }

    let mut chosen: Vec<OfflineRecord> = state
        .offline
        .iter()
        .filter(|r| r.process_id == pid)
        .cloned()
        .collect();
    chosen.sort_by_key(|r| (r.seq, r.id));
    chosen.truncate(limit);
    if clear {
        let ids: Vec<u64> = chosen.iter().map(|r| r.id).collect();
        state.offline.retain(|r| !ids.contains(&r.id));
        // Records of this process past the limit go back to the queue.
        for r in state.offline.iter_mut().filter(|r| r.process_id == pid) {
            r.process_id.clear();
        }
    }
    json!({
        "process_id": if clear { Value::Null } else { json!(pid) },
        "events": chosen.iter().map(OfflineRecord::to_json).collect::<Vec<_>>(),
    })
}

/// What a batch produced: the answer's `result` and a record per command.
pub struct BatchOutcome {
    pub result: Value,
    pub calls: Vec<Call>,
    pub processing: f64,
}

/// `batch`: each command runs like a call of its own with the batch's token; its
/// answer goes under its key in `result` or `result_error`; `halt` stops at the first
/// error. Empty maps are written `[]`, as PHP writes them.
pub fn batch(
    state: &mut State,
    cmd: Vec<(String, PValue)>,
    halt: bool,
    token: &str,
    now: Instant,
) -> BatchOutcome {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    let mut times = Vec::new();
    let mut calls = Vec::new();
    let mut processing = 0.0;
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
            run(state, &method, &params, now)
        };
        if let Some(t) = timing {
            processing += t.processing;
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
            Ok(v) => ok.push((key, v)),
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
        "result_total": php_map(Vec::new()),
        "result_next": php_map(Vec::new()),
        "result_time": php_map(times),
    });
    BatchOutcome {
        result,
        calls,
        processing,
    }
}
