use super::*;
use serde_json::json;

fn fixture(name: &str) -> Value {
    let path = format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn deal_recurring_expose_seed_parses_with_tokens() {
    let e = InboundEvent::parse(&fixture("deal_recurring_expose.json")).unwrap();
    assert_eq!(e.event.as_str(), "ONCRMDEALRECURRINGEXPOSE");
    assert_eq!(e.event_handler_id.as_deref(), Some("683"));
    assert_eq!(e.ts, Some(1741092489));
    assert_eq!(
        e.auth.member_id.unwrap().as_str(),
        "a223c6b3710f85df22e9377d6c4f7553"
    );
    assert_eq!(
        e.auth.access_token.unwrap().expose(),
        "s6p6eclrvim6da22ft9ch94ekreb52lv"
    );
    assert_eq!(e.auth.expires_in, Some(3600));
    assert_eq!(
        DealRecurringExpose::from_data(&e.data).unwrap(),
        DealRecurringExpose {
            id: 9,
            recurring_deal_id: 6791,
            deal_id: 6799
        }
    );
}

#[test]
fn requisite_seed_parses_with_lower_case_code_and_numeric_id() {
    let e = InboundEvent::parse(&fixture("requisite_add.json")).unwrap();
    assert_eq!(e.event.as_str(), "ONCRMREQUISITEADD");
    assert_eq!(RequisiteAdd::from_data(&e.data).unwrap().id, 27);
    assert_eq!(e.auth.status.as_deref(), Some("F"));
}

#[test]
fn payment_seed_parses_without_tokens_or_member_id() {
    let e = InboundEvent::parse(&fixture("app_payment.json")).unwrap();
    assert_eq!(e.event.as_str(), "ONAPPPAYMENT");
    assert!(e.auth.access_token.is_none());
    assert!(e.auth.application_token.is_none());
    assert!(e.auth.member_id.is_none());
    assert_eq!(e.auth.domain.as_deref(), Some("some-domain.bitrix24.com"));
    assert_eq!(
        AppPayment::from_data(&e.data).unwrap(),
        AppPayment {
            code: "bitrix.gds_company".into(),
            version: Some("1".into()),
            status: Some("S".into()),
            payment_expired: Some(false),
            days: Some(28),
            language_id: Some("en".into()),
        }
    );
}

#[test]
fn payment_fields_no_handler_trusts_are_not_checked() {
    // What installed apps send (VERSION "1.0.0"), empty or odd values: accepted, kept
    // when well-formed. Only the portal's identity is required.
    let mut v = fixture("app_payment.json");
    v["data"] = json!({"CODE": "c", "VERSION": "1.0.0", "DAYS": "", "PAYMENT_EXPIRED": "maybe"});
    let e = InboundEvent::parse(&v).unwrap();
    let p = AppPayment::from_data(&e.data).unwrap();
    assert_eq!(p.version.as_deref(), Some("1.0.0"));
    assert_eq!((p.days, p.payment_expired, p.status), (None, None, None));
    v["data"] = json!({});
    assert!(
        InboundEvent::parse(&v).is_ok(),
        "no data at all is still the portal's event"
    );
}

#[test]
fn install_event_needs_its_token_and_endpoints_and_nothing_else() {
    let install = fixture("app_install.json");
    let e = InboundEvent::parse(&install).unwrap();
    assert_eq!(e.data["VERSION"], "1.0.0");
    for (field, value, expected) in [
        (
            "application_token",
            None,
            "missing field `auth[application_token]`",
        ),
        (
            "client_endpoint",
            None,
            "missing field `auth[client_endpoint]`",
        ),
        (
            "server_endpoint",
            None,
            "missing field `auth[server_endpoint]`",
        ),
        (
            "client_endpoint",
            Some("ftp://x/"),
            "field `auth[client_endpoint]`: expected an http(s) URL",
        ),
        (
            "client_endpoint",
            Some("https:///rest/"),
            "field `auth[client_endpoint]`: expected an http(s) URL",
        ),
        (
            "server_endpoint",
            Some("https://a b/"),
            "field `auth[server_endpoint]`: expected an http(s) URL",
        ),
    ] {
        let mut v = install.clone();
        let auth = v["auth"].as_object_mut().unwrap();
        match value {
            Some(x) => auth.insert(field.into(), json!(x)),
            None => auth.remove(field),
        };
        assert_eq!(InboundEvent::parse(&v).unwrap_err().to_string(), expected);
    }
    // Its update carries tokens and no endpoints, as documented.
    assert!(InboundEvent::parse(&fixture("app_update.json")).is_ok());
}

#[test]
fn event_without_member_id_is_refused_unless_documented_so() {
    let mut v = fixture("requisite_add.json");
    v["auth"].as_object_mut().unwrap().remove("member_id");
    assert_eq!(
        InboundEvent::parse(&v).unwrap_err(),
        InboundError::Missing("auth[member_id]")
    );
    let mut v = fixture("app_payment.json");
    v["auth"].as_object_mut().unwrap().remove("domain");
    assert_eq!(
        InboundEvent::parse(&v).unwrap_err(),
        InboundError::Missing("auth[member_id]")
    );
}

#[test]
fn known_event_with_bad_data_is_refused() {
    let mut v = fixture("deal_recurring_expose.json");
    v["data"]["FIELDS"]["DEAL_ID"] = json!("abc");
    assert_eq!(
        InboundEvent::parse(&v).unwrap_err().to_string(),
        "field `data[FIELDS][DEAL_ID]`: expected a positive integer id"
    );
    let mut v = fixture("requisite_add.json");
    v["data"]["FIELDS"]["ID"] = json!("0");
    assert!(InboundEvent::parse(&v).is_err());
}

#[test]
fn every_placement_seed_maps_to_its_entity_type() {
    let all = fixture("placements.json");
    let expected = [
        ("CRM_LEAD_DETAIL_ACTIVITY", 1, 6591),
        ("CRM_DEAL_DETAIL_ACTIVITY", 2, 3473),
        ("CRM_CONTACT_DETAIL_ACTIVITY", 3, 13037),
        ("CRM_COMPANY_DETAIL_ACTIVITY", 4, 2946),
        ("CRM_QUOTE_DETAIL_ACTIVITY", 7, 5),
        ("CRM_SMART_INVOICE_DETAIL_ACTIVITY", 31, 32),
        ("CRM_DYNAMIC_183_DETAIL_ACTIVITY", 183, 3),
    ];
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), expected.len());
    for (v, (code, type_id, item)) in all.iter().zip(expected) {
        let p = PlacementCall::parse(v).unwrap();
        assert_eq!(p.placement.as_str(), code);
        assert_eq!(p.crm_entity_type_id(), Some(type_id), "{code}");
        assert_eq!(p.crm_item_id().unwrap(), item, "{code}");
        assert_eq!(p.domain, "xxx.bitrix24.com");
        assert!(p.auth_id.is_some() && p.refresh_id.is_some());
    }
}

#[test]
fn placement_codes_that_are_not_crm_items_have_no_entity_type() {
    for code in [
        "CRM_DYNAMIC__DETAIL_ACTIVITY",
        "CRM_DYNAMIC_0183_DETAIL_ACTIVITY",
        "CRM_DYNAMIC_X_DETAIL_ACTIVITY",
        "CRM_DEAL_LIST_MENU",
        "DEFAULT",
    ] {
        assert_eq!(crm_entity_type_id(code), None, "{code}");
    }
}

#[test]
fn placement_options_must_be_a_json_object_with_an_id() {
    let mut v = fixture("placements.json")[1].clone();
    v["PLACEMENT_OPTIONS"] = json!("{not json");
    assert_eq!(
        PlacementCall::parse(&v).unwrap_err().to_string(),
        "field `PLACEMENT_OPTIONS`: expected a JSON object"
    );
    v["PLACEMENT_OPTIONS"] = json!("{\"X\":1}");
    assert_eq!(
        PlacementCall::parse(&v).unwrap_err(),
        InboundError::Missing("PLACEMENT_OPTIONS.ID")
    );
}

#[test]
fn install_page_parses_tokens_and_options() {
    let i = InstallCall::parse(&fixture("install.json")).unwrap();
    assert_eq!(i.member_id.as_str(), "a223c6b3710f85df22e9377d6c4f7553");
    assert!(i.auth_id.expose().starts_with("29d1a066"));
    assert_eq!(i.application_token, None);
    let mut v = fixture("install.json");
    v.as_object_mut().unwrap().remove("REFRESH_ID");
    assert_eq!(
        InstallCall::parse(&v).unwrap_err(),
        InboundError::Missing("REFRESH_ID")
    );
}

#[test]
fn body_decoding_follows_the_content_type() {
    let limits = FormLimits::default();
    let form = decode_body(
        Some("application/x-www-form-urlencoded; charset=UTF-8"),
        b"event=ONAPPUNINSTALL&auth[member_id]=abc",
        None,
        &limits,
    )
    .unwrap();
    assert_eq!(
        form,
        json!({"event": "ONAPPUNINSTALL", "auth": {"member_id": "abc"}})
    );
    let js = decode_body(Some("Application/JSON"), br#"{"a":1}"#, None, &limits).unwrap();
    assert_eq!(js, json!({"a": 1}));
    assert!(decode_body(Some("text/plain"), b"a=1", None, &limits)
        .unwrap_err()
        .is_unsupported_media_type());
    assert!(decode_body(None, b"a=1", None, &limits)
        .unwrap_err()
        .is_unsupported_media_type());
    assert_eq!(
        decode_body(Some("application/json"), b"[1]", None, &limits).unwrap_err(),
        InboundError::NotAnObject("an array")
    );
    assert_eq!(
        decode_body(Some("application/json"), b"", None, &limits).unwrap_err(),
        InboundError::EmptyBody
    );
    let deep = format!(
        "{}{}",
        "{\"a\":".repeat(100),
        "1".to_string() + &"}".repeat(100)
    );
    assert_eq!(
        decode_body(Some("application/json"), deep.as_bytes(), None, &limits).unwrap_err(),
        InboundError::TooDeep(limits.max_depth)
    );
}

#[test]
fn query_string_fills_in_but_body_wins() {
    let v = decode_body(
        Some("application/x-www-form-urlencoded"),
        b"DOMAIN=body.bitrix24.com&AUTH_ID=x",
        Some("DOMAIN=query.bitrix24.com&LANG=en"),
        &FormLimits::default(),
    )
    .unwrap();
    assert_eq!(v["DOMAIN"], "body.bitrix24.com");
    assert_eq!(v["LANG"], "en");
}

#[test]
fn error_messages_never_contain_values() {
    let mut v = fixture("deal_recurring_expose.json");
    v["auth"]["member_id"] = json!("s6p6eclrvim6da22ft9ch94ekreb52lv!");
    let msg = InboundEvent::parse(&v).unwrap_err().to_string();
    assert!(!msg.contains("s6p6ecl"), "{msg}");
}

#[test]
fn redact_hides_every_credential_and_keeps_the_rest() {
    let v = fixture("deal_recurring_expose.json");
    let r = redact(&v);
    let text = r.to_string();
    for secret in [
        "s6p6eclrvim6da22ft9ch94ekreb52lv",
        "4s386p3q0tr8dy89xvmt96234v3dljg8",
        "51856fefc120afa4b628cc82d3935cce",
    ] {
        assert!(!text.contains(secret), "{text}");
    }
    assert_eq!(r["auth"]["member_id"], v["auth"]["member_id"]);
    assert_eq!(r["data"], v["data"]);
    let p = redact(&fixture("placements.json"));
    assert!(!p.to_string().contains("29d1a06600631fcd"));
    assert_eq!(p[0]["PLACEMENT"], "CRM_LEAD_DETAIL_ACTIVITY");
}

#[test]
fn a_nul_in_a_body_or_its_query_is_refused_naming_the_field() {
    let limits = FormLimits::default();
    let form = decode_body(
        Some("application/x-www-form-urlencoded"),
        b"event=X&data[FIELDS][TITLE]=top%00secret",
        None,
        &limits,
    );
    assert_eq!(
        form.unwrap_err().to_string(),
        "field `data[FIELDS][TITLE]` contains a NUL character, which cannot be stored"
    );
    let js = decode_body(
        Some("application/json"),
        br#"{"data":{"A":["x","top\u0000secret"]}}"#,
        None,
        &limits,
    );
    assert_eq!(js.unwrap_err(), InboundError::Nul("data[A][1]".into()));
    let query = decode_body(
        Some("application/x-www-form-urlencoded"),
        b"PLACEMENT=X",
        Some("LANG=e%00n"),
        &limits,
    );
    assert_eq!(query.unwrap_err().reason(), "nul");
    // Text that only looks like one is kept.
    let v = decode_body(
        Some("application/x-www-form-urlencoded"),
        b"a=%2500&b=%5Cu0000",
        None,
        &limits,
    )
    .unwrap();
    assert_eq!(v, json!({"a": "%00", "b": "\\u0000"}));
}
