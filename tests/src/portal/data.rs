//! Synthetic CRM records, the same for the same id on every run, shaped like the
//! answers in Bitrix24's documentation: the classic `crm.deal.*` methods give every
//! value as a string (and `null`, and `""` for a date never set), `crm.item.get` gives
//! camelCase keys with real numbers, and recurring templates mix both inside `PARAMS`.
//! A store that normalises or drops any of that fails the comparison tests make.

use chrono::{DateTime, FixedOffset, SecondsFormat, TimeDelta, TimeZone};
use serde_json::{json, Value};

/// The portal's time zone; not UTC, so offsets get parsed for real.
pub fn tz() -> FixedOffset {
    FixedOffset::east_opt(3 * 3600)
        .unwrap_or_else(|| FixedOffset::east_opt(0).expect("0 is a valid offset"))
}

/// A Bitrix24 date-time string, `2025-03-04T12:00:00+03:00`.
pub fn iso(t: DateTime<FixedOffset>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, false)
}

/// splitmix64: a few well-mixed bits per (id, salt) to vary the records.
fn mix(id: u64, salt: u64) -> u64 {
    let mut z = id
        .wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn pick<'a>(id: u64, salt: u64, options: &[&'a str]) -> &'a str {
    let n = options.len().max(1) as u64;
    options
        .get((mix(id, salt) % n) as usize)
        .copied()
        .unwrap_or("")
}

/// A date-time some days (and minutes) after 2025-01-01 09:00 portal time.
fn date(id: u64, salt: u64, days_after: i64) -> String {
    let base = tz().with_ymd_and_hms(2025, 1, 1, 9, 0, 0).single();
    let days = (mix(id, salt) % 365) as i64 + days_after;
    let minutes = (mix(id, salt ^ 0x55) % 600) as i64;
    let t = base.and_then(|b| {
        b.checked_add_signed(TimeDelta::try_days(days)?)?
            .checked_add_signed(TimeDelta::try_minutes(minutes)?)
    });
    t.map(iso).unwrap_or_default()
}

/// `crm.deal.get`.
pub fn deal(id: u64) -> Value {
    let stages = [
        ("NEW", "P"),
        ("PREPARATION", "P"),
        ("PREPAYMENT_INVOICE", "P"),
        ("EXECUTING", "P"),
        ("FINAL_INVOICE", "P"),
        ("WON", "S"),
        ("LOSE", "F"),
    ];
    let (stage, semantic) = stages[(mix(id, 1) % stages.len() as u64) as usize];
    let amount = mix(id, 2) % 1_000_000;
    let created = date(id, 3, 0);
    let first = json!({
        "ID": id.to_string(),
        "TITLE": format!("Deal #{id}"),
        "TYPE_ID": pick(id, 4, &["SALE", "COMPLEX", "GOODS", "SERVICE"]),
        "STAGE_ID": stage,
        "PROBABILITY": if mix(id, 5).is_multiple_of(2) { Value::Null } else { json!((mix(id, 5) % 100).to_string()) },
        "CURRENCY_ID": pick(id, 6, &["USD", "EUR", "RUB"]),
        "OPPORTUNITY": format!("{}.{:02}", amount / 100, amount % 100),
        "IS_MANUAL_OPPORTUNITY": "N",
        "TAX_VALUE": "0.00",
        "LEAD_ID": Value::Null,
        "COMPANY_ID": (mix(id, 7) % 50).to_string(),
        "CONTACT_ID": (mix(id, 8) % 80 + 1).to_string(),
        "QUOTE_ID": Value::Null,
        "BEGINDATE": date(id, 3, 0),
        "CLOSEDATE": date(id, 3, 10),
        "ASSIGNED_BY_ID": "1",
        "CREATED_BY_ID": "1",
        "MODIFY_BY_ID": "1",
        "DATE_CREATE": created,
        "DATE_MODIFY": date(id, 3, 1),
    });
    let rest = json!({
        "OPENED": "Y",
        "CLOSED": if semantic == "P" { "N" } else { "Y" },
        // Markup, quotes and non-ASCII, as users type them, to catch escaping bugs.
        "COMMENTS": format!("[B]Synthetic deal {id}[/B] <b>Ёлка & «ёж»</b> \"quoted\" 'single' \\ back"),
        "ADDITIONAL_INFO": Value::Null,
        "LOCATION_ID": Value::Null,
        "CATEGORY_ID": "0",
        "STAGE_SEMANTIC_ID": semantic,
        "IS_NEW": if stage == "NEW" { "Y" } else { "N" },
        "IS_RECURRING": "N",
        "IS_RETURN_CUSTOMER": "N",
        "IS_REPEATED_APPROACH": "N",
        "SOURCE_ID": pick(id, 9, &["CALL", "WEB", "EMAIL", "CALLBACK"]),
        "SOURCE_DESCRIPTION": Value::Null,
        "ORIGINATOR_ID": Value::Null,
        "ORIGIN_ID": Value::Null,
        "MOVED_BY_ID": "1",
        "MOVED_TIME": date(id, 3, 1),
        "LAST_ACTIVITY_TIME": date(id, 3, 2),
        "LAST_ACTIVITY_BY": "1",
        "UTM_SOURCE": Value::Null,
        "UTM_MEDIUM": Value::Null,
        "UTM_CAMPAIGN": Value::Null,
        "UTM_CONTENT": Value::Null,
        "UTM_TERM": Value::Null,
    });
    merge(first, rest)
}

/// The keys of `b` added to `a` (`json!` cannot take a whole deal at once).
fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// The deal a recurring template `id` copies. Chosen so that the seed's template 9
/// points at its deal 6791 (seed 000: ID 9, RECURRING_DEAL_ID 6791).
pub fn recurring_deal_id(template_id: u64) -> u64 {
    template_id.saturating_add(6782)
}

/// `crm.deal.recurring.get`: strings outside `PARAMS`, numbers inside it, `null`s,
/// and `""` for a template that never ran, as the documentation shows.
pub fn recurring(id: u64) -> Value {
    let deal_id = recurring_deal_id(id);
    let limit = pick(id, 11, &["N", "D", "T"]);
    let counter = mix(id, 12) % 5;
    let multiple = !mix(id, 13).is_multiple_of(3);
    let period = |salt| pick(id, salt, &["day", "week", "month", "year"]);
    let params = if multiple {
        json!({
            "MODE": "multiple",
            "SINGLE_BEFORE_START_DATE_TYPE": Value::Null,
            "SINGLE_BEFORE_START_DATE_VALUE": 0,
            "MULTIPLE_TYPE": period(14),
            "MULTIPLE_INTERVAL": mix(id, 15) % 6 + 1,
            "OFFSET_BEGINDATE_TYPE": period(16),
            "OFFSET_BEGINDATE_VALUE": mix(id, 17) % 3,
            "OFFSET_CLOSEDATE_TYPE": period(18),
            "OFFSET_CLOSEDATE_VALUE": mix(id, 19) % 3 + 1,
        })
    } else {
        json!({
            "MODE": "single",
            "SINGLE_BEFORE_START_DATE_TYPE": period(20),
            "SINGLE_BEFORE_START_DATE_VALUE": mix(id, 21) % 10,
            "MULTIPLE_TYPE": Value::Null,
            "MULTIPLE_INTERVAL": 0,
            "OFFSET_BEGINDATE_TYPE": "day",
            "OFFSET_BEGINDATE_VALUE": 0,
            "OFFSET_CLOSEDATE_TYPE": "month",
            "OFFSET_CLOSEDATE_VALUE": 1,
        })
    };
    json!({
        "ID": id.to_string(),
        "DEAL_ID": deal_id.to_string(),
        "BASED_ID": deal_id.saturating_sub(4).to_string(),
        "ACTIVE": if mix(id, 10).is_multiple_of(7) { "N" } else { "Y" },
        "CATEGORY_ID": pick(id, 22, &["0", "0", "2"]),
        "IS_LIMIT": limit,
        "COUNTER_REPEAT": if counter == 0 { Value::Null } else { json!(counter.to_string()) },
        "LIMIT_REPEAT": if limit == "T" { json!((mix(id, 23) % 20 + 5).to_string()) } else { Value::Null },
        "LIMIT_DATE": if limit == "D" { json!(date(id, 24, 400)) } else { Value::Null },
        "START_DATE": date(id, 25, 0),
        "NEXT_EXECUTION": date(id, 25, 30),
        "LAST_EXECUTION": if counter == 0 { String::new() } else { date(id, 25, 1) },
        "PARAMS": params,
    })
}

/// `crm.requisite.get`.
pub fn requisite(id: u64) -> Value {
    let company = mix(id, 30) % 90 + 1;
    let inn = 1_000_000_000 + mix(id, 31) % 9_000_000_000;
    json!({
        "ID": id.to_string(),
        "ENTITY_TYPE_ID": "4",
        "ENTITY_ID": company.to_string(),
        "PRESET_ID": "1",
        "DATE_CREATE": date(id, 32, 0),
        "DATE_MODIFY": "",
        "CREATED_BY_ID": "1",
        "MODIFY_BY_ID": Value::Null,
        "NAME": "Organization",
        "CODE": Value::Null,
        "XML_ID": Value::Null,
        "ORIGINATOR_ID": Value::Null,
        "ACTIVE": "Y",
        "ADDRESS_ONLY": "N",
        "SORT": "500",
        "RQ_NAME": Value::Null,
        "RQ_COMPANY_NAME": format!("Ltd. \"Company {company}\""),
        "RQ_COMPANY_FULL_NAME": format!("ООО «Компания {company}» & Co"),
        "RQ_COMPANY_REG_DATE": "06.04.2007",
        "RQ_DIRECTOR": "SMITH JOHN",
        "RQ_ACCOUNTANT": Value::Null,
        "RQ_EMAIL": Value::Null,
        "RQ_PHONE": Value::Null,
        "RQ_INN": inn.to_string(),
        "RQ_KPP": "770501001",
        "RQ_OGRN": (5_000_000_000_000 + mix(id, 33) % 999_999_999_999).to_string(),
        "RQ_OKPO": Value::Null,
        "RQ_VAT_PAYER": "N",
        "RQ_VAT_ID": Value::Null,
    })
}

/// The system CRM types `crm.item.get` knows: lead, deal, contact, company, quote,
/// smart invoice. Smart processes exist only once added to the portal.
pub fn system_entity_type(entity_type_id: u64) -> bool {
    matches!(entity_type_id, 1 | 2 | 3 | 4 | 7 | 31)
}

/// The fields of a smart process type `crm.type.list` filters and sorts by.
pub const TYPE_FIELDS: &[&str] = &[
    "id",
    "title",
    "code",
    "createdBy",
    "entityTypeId",
    "customSectionId",
    "isCategoriesEnabled",
    "isStagesEnabled",
    "isBeginCloseDatesEnabled",
    "isClientEnabled",
    "isUseInUserfieldEnabled",
    "isLinkWithProductsEnabled",
    "isMycompanyEnabled",
    "isDocumentsEnabled",
    "isSourceEnabled",
    "isObserversEnabled",
    "isRecyclebinEnabled",
    "isAutomationEnabled",
    "isBizProcEnabled",
    "isSetOpenPermissions",
    "isPaymentsEnabled",
    "isCountersEnabled",
    "createdTime",
    "updatedTime",
    "updatedBy",
];

/// A smart process as `crm.type.list` lists it
/// (api-reference/crm/universal/user-defined-object-types/crm-type-list.md).
pub fn smart_process_type(id: u64, entity_type_id: u64, title: &str, created: &str) -> Value {
    let yn = |salt| {
        if mix(entity_type_id, salt).is_multiple_of(2) {
            "Y"
        } else {
            "N"
        }
    };
    json!({
        "id": id,
        "title": title,
        "code": "",
        "createdBy": 1,
        "entityTypeId": entity_type_id,
        "customSectionId": Value::Null,
        "isCategoriesEnabled": yn(60),
        "isStagesEnabled": "Y",
        "isBeginCloseDatesEnabled": yn(61),
        "isClientEnabled": "Y",
        "isUseInUserfieldEnabled": yn(62),
        "isLinkWithProductsEnabled": yn(63),
        "isMycompanyEnabled": yn(64),
        "isDocumentsEnabled": yn(65),
        "isSourceEnabled": yn(66),
        "isObserversEnabled": yn(67),
        "isRecyclebinEnabled": yn(68),
        "isAutomationEnabled": yn(69),
        "isBizProcEnabled": yn(70),
        "isSetOpenPermissions": yn(71),
        "isPaymentsEnabled": "N",
        "isCountersEnabled": "N",
        "createdTime": created,
        "updatedTime": created,
        "updatedBy": 1,
    })
}

/// `user.current` (api-reference/user/user-current.md): `ID` as a string, `ACTIVE` a
/// boolean, departments for employees (none for an extranet user).
pub fn user(u: &super::state::User) -> Value {
    json!({
        "ID": u.id.to_string(),
        "ACTIVE": true,
        "NAME": u.name,
        "LAST_NAME": u.last_name,
        "EMAIL": format!("user{}@example.com", u.id),
        "LAST_LOGIN": date(u.id, 50, 200),
        "DATE_REGISTER": date(u.id, 51, 0),
        "IS_ONLINE": "Y",
        "LAST_ACTIVITY_DATE": date(u.id, 50, 200),
        "PERSONAL_GENDER": "",
        "PERSONAL_BIRTHDAY": "",
        "WORK_POSITION": if u.admin { "Administrator" } else { "" },
        "UF_EMPLOYMENT_DATE": "",
        "UF_DEPARTMENT": if u.intranet { json!([1]) } else { json!([]) },
    })
}

/// `crm.item.get`: `{"item": {...}}`, camelCase keys, numbers as numbers.
pub fn item(entity_type_id: u64, id: u64) -> Value {
    let amount = (mix(id, 40) % 100_000) as f64 / 10.0;
    let mut item = json!({
        "id": id,
        "xmlId": Value::Null,
        "title": format!("Item #{id} of type {entity_type_id}"),
        "createdBy": 1,
        "updatedBy": 1,
        "movedBy": 1,
        "createdTime": date(id, 41, 0),
        "updatedTime": date(id, 41, 1),
        "movedTime": date(id, 41, 1),
        "opened": "Y",
        "assignedById": 1,
        "companyId": mix(id, 42) % 20,
        "contactId": 0,
        "contactIds": [],
        "observers": [],
        "opportunity": amount,
        "isManualOpportunity": "N",
        "taxValue": 0,
        "currencyId": pick(id, 43, &["USD", "EUR", "RUB"]),
        "sourceId": "WEB",
        "sourceDescription": Value::Null,
        "webformId": 0,
        "lastActivityBy": 1,
        "lastActivityTime": date(id, 41, 2),
        "comments": "<p>Ёлка & \"quotes\"</p>",
        "utmSource": Value::Null,
        "utmMedium": Value::Null,
        "utmCampaign": Value::Null,
        "utmContent": Value::Null,
        "utmTerm": Value::Null,
        "entityTypeId": entity_type_id,
    });
    let stage = match entity_type_id {
        1 => Some(("IN_PROCESS".to_owned(), None)),
        2 => Some(("NEW".to_owned(), Some(0))),
        7 => Some(("DRAFT".to_owned(), None)),
        31 => Some(("DT31_1:N".to_owned(), Some(1))),
        n if n >= 128 => Some((format!("DT{n}_{}:NEW", n % 100), Some(n % 100))),
        _ => None,
    };
    if let (Some((stage, category)), Some(o)) = (stage, item.as_object_mut()) {
        o.insert("stageId".into(), json!(stage));
        o.insert("previousStageId".into(), json!(""));
        o.insert("stageSemanticId".into(), json!("P"));
        if let Some(c) = category {
            o.insert("categoryId".into(), json!(c));
        }
    }
    json!({ "item": item })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_deterministic_and_shaped_like_bitrix() {
        assert_eq!(deal(6799), deal(6799));
        assert_ne!(deal(1), deal(2));
        assert_eq!(deal(6799)["ID"], "6799");
        assert!(deal(6799)["OPPORTUNITY"].is_string());
        let t = recurring(9);
        assert_eq!(t["DEAL_ID"], "6791");
        assert!(t["PARAMS"]["MULTIPLE_INTERVAL"].is_number());
        assert!(t["START_DATE"]
            .as_str()
            .is_some_and(|s| s.ends_with("+03:00")));
        assert_eq!(item(2, 5)["item"]["id"], 5);
        assert_eq!(item(2, 5)["item"]["entityTypeId"], 2);
        assert_eq!(item(u64::MAX, u64::MAX)["item"]["id"], u64::MAX);
        assert_eq!(recurring(u64::MAX)["ID"], u64::MAX.to_string());
    }
}
