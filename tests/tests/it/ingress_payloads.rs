//! What the edge checks in a payload and what it passes on: a NUL anywhere is refused
//! (PostgreSQL's jsonb cannot store it), only the fields a handler uses are validated,
//! and OAuth tokens reach the queue only in the messages that need them.

use b24_shared::EnvelopeKind;
use b24_tests::fixtures;
use b24_tests::http::{FORM, JSON};
use b24_tests::phpform::{http_build_query, stringify};
use b24_tests::spawn::TestIngress;
use http::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn a_nul_anywhere_is_refused_with_the_field_named() {
    let ingress = TestIngress::spawn("nul", &[]).await;
    let mut in_value = fixtures::requisite_add();
    in_value["data"]["FIELDS"]["TITLE"] = json!("secret\u{0}value");
    let mut in_list = fixtures::requisite_add();
    in_list["data"]["LIST"] = json!(["a", "b\u{0}"]);
    let mut in_key = fixtures::requisite_add();
    in_key["data"]["FIELDS"]["X\u{0}Y"] = json!("1");
    let mut in_auth = fixtures::requisite_add();
    in_auth["auth"]["domain"] = json!("\u{0}");
    let mut no_lang = fixtures::placements()[1].clone();
    no_lang.as_object_mut().unwrap().remove("LANG");
    let mut install = fixtures::install();
    install["APP_SID"] = json!("x\u{0}");
    // (route, content type, body, field the reason names)
    let cases: Vec<(&str, &str, String, &str)> = vec![
        (
            "/events",
            FORM,
            http_build_query(&in_value),
            "data[FIELDS][TITLE]",
        ),
        ("/events", JSON, in_value.to_string(), "data[FIELDS][TITLE]"),
        ("/events", FORM, http_build_query(&in_list), "data[LIST][1]"),
        ("/events", JSON, in_list.to_string(), "data[LIST][1]"),
        // A form key is cut at a NUL (as PHP does); a JSON key keeps it.
        ("/events", JSON, in_key.to_string(), "data[FIELDS][X\\0Y]"),
        ("/events", FORM, http_build_query(&in_auth), "auth[domain]"),
        // Widget and install calls bring some fields in the query string.
        (
            "/placement?LANG=e%00n",
            FORM,
            http_build_query(&no_lang),
            "LANG",
        ),
        ("/install", JSON, install.to_string(), "APP_SID"),
    ];
    for (path, ct, body, field) in cases {
        let a = ingress.http.post(path, Some(ct), body).await.unwrap();
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{path} {ct}: {}", a.body);
        assert!(
            a.body.contains(&format!("`{field}`")) && a.body.contains("NUL"),
            "{path} {ct}: reason {:?} should name `{field}`",
            a.body
        );
        assert!(
            !a.body.contains("secret"),
            "no value in the reason: {}",
            a.body
        );
        assert_eq!(a.body.trim_end().lines().count(), 1);
    }
    assert!(
        ingress.work_messages().await.is_empty(),
        "nothing published"
    );
    ingress.finish().await;
}

#[tokio::test]
async fn documented_install_update_and_payment_shapes_are_accepted() {
    let ingress = TestIngress::spawn("shapes", &[]).await;
    let mut payment_semver = fixtures::app_payment();
    payment_semver["data"]["VERSION"] = json!("1.0.0");
    payment_semver["data"]["DAYS"] = json!("");
    let mut payment_bare = fixtures::app_payment();
    payment_bare["data"] = json!({"CODE": "x"});
    let accepted = [
        fixtures::app_install(),
        fixtures::app_update(),
        fixtures::app_payment(),
        payment_semver,
        payment_bare,
    ];
    for event in &accepted {
        for (ct, body) in [(FORM, http_build_query(event)), (JSON, event.to_string())] {
            let a = ingress.http.post("/events", Some(ct), body).await.unwrap();
            assert_eq!(
                a.status,
                StatusCode::OK,
                "{} {ct}: {}",
                event["event"],
                a.body
            );
        }
    }
    assert_eq!(ingress.work_messages().await.len(), 2 * accepted.len());

    // What the worker needs of an ONAPPINSTALL must be there and well-formed.
    for (field, value, reason) in [
        (
            "application_token",
            None,
            "missing field `auth[application_token]`",
        ),
        ("member_id", None, "missing field `auth[member_id]`"),
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
            Some("javascript:alert(1)"),
            "field `auth[client_endpoint]`",
        ),
        (
            "server_endpoint",
            Some("https://"),
            "field `auth[server_endpoint]`",
        ),
    ] {
        let mut install = fixtures::app_install();
        let auth = install["auth"].as_object_mut().unwrap();
        match value {
            Some(v) => auth.insert(field.into(), json!(v)),
            None => auth.remove(field),
        };
        let a = ingress.post_form("/events", &install).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{field}: {}", a.body);
        assert!(a.body.contains(reason), "{field}: {}", a.body);
    }
    assert!(ingress.work_messages().await.is_empty());
    ingress.finish().await;
}

/// The payload as the ingress decodes it from a form, less `keys` at `path`.
fn without(payload: &Value, path: &[&str], keys: &[&str]) -> Value {
    let mut v = stringify(payload);
    let mut at = &mut v;
    for p in path {
        at = &mut at[*p];
    }
    for k in keys {
        at.as_object_mut().unwrap().remove(*k);
    }
    v
}

#[tokio::test]
async fn only_the_messages_that_need_oauth_tokens_carry_them_to_the_queue() {
    let ingress = TestIngress::spawn("tokens", &[]).await;
    let mut install_with_tokens = fixtures::app_install();
    install_with_tokens["auth"]["access_token"] = json!("install-access");
    install_with_tokens["auth"]["refresh_token"] = json!("install-refresh");
    let placement = fixtures::placements()[1].clone();
    // (route, what was sent, what the queue must hold)
    let cases = [
        (
            "/events",
            fixtures::deal_recurring_expose(),
            without(
                &fixtures::deal_recurring_expose(),
                &["auth"],
                &["access_token", "refresh_token"],
            ),
        ),
        (
            "/events",
            fixtures::requisite_add(),
            without(
                &fixtures::requisite_add(),
                &["auth"],
                &["access_token", "refresh_token"],
            ),
        ),
        (
            "/events",
            install_with_tokens.clone(),
            stringify(&install_with_tokens),
        ),
        (
            "/events",
            fixtures::app_update(),
            stringify(&fixtures::app_update()),
        ),
        (
            "/placement",
            placement.clone(),
            without(&placement, &[], &["REFRESH_ID"]),
        ),
        (
            "/install",
            fixtures::install(),
            stringify(&fixtures::install()),
        ),
    ];
    for (path, sent, _) in &cases {
        let a = ingress.post_form(path, sent).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.body);
    }
    let got = ingress.work_messages().await;
    assert_eq!(got.len(), cases.len());
    for (env, (path, _, expected)) in got.iter().zip(&cases) {
        assert_eq!(&env.payload, expected, "{path} {}", env.event);
    }
    // The application_token stays (the worker checks it again), AUTH_ID stays (the
    // worker calls crm.item.get as the widget's user).
    assert_eq!(
        got[0].payload["auth"]["application_token"],
        "51856fefc120afa4b628cc82d3935cce"
    );
    assert_eq!(got[4].kind, EnvelopeKind::Placement);
    assert_eq!(got[4].payload["AUTH_ID"], placement["AUTH_ID"]);
    ingress.finish().await;
}
