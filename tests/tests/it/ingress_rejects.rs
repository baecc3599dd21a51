use b24_tests::fixtures;
use b24_tests::http::{FORM, JSON};
use b24_tests::phpform::http_build_query;
use b24_tests::spawn::TestIngress;
use http::StatusCode;

const MEMBER: &str = "auth[member_id]=a223c6b3710f85df22e9377d6c4f7553";

/// Each bad request gets its 4xx and a one-line reason that says what was wrong,
/// and nothing at all reaches the queue.
#[tokio::test]
async fn bad_input_gets_a_4xx_with_a_reason_and_nothing_is_published() {
    let ingress = TestIngress::spawn("rejects", &[]).await;
    let deep_key = format!(
        "event=ONCRMREQUISITEADD&{MEMBER}&data{}=1",
        "[a]".repeat(10_000)
    );
    let nested_key = format!(
        "event=ONCRMREQUISITEADD&{MEMBER}&data{}=1",
        "[a]".repeat(40)
    );
    let five_mb = format!("event=ONCRMREQUISITEADD&{MEMBER}&x={}", "a".repeat(5 << 20));
    let mut no_member = fixtures::requisite_add();
    no_member["auth"]
        .as_object_mut()
        .unwrap()
        .remove("member_id");
    let mut no_event = fixtures::requisite_add();
    no_event.as_object_mut().unwrap().remove("event");
    // (route, content type, body, expected status, what the reason must mention)
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, StatusCode, &'a str);
    let cases: Vec<Case> = vec![
        ("/events", Some(FORM), vec![], StatusCode::BAD_REQUEST, "empty body"),
        ("/events", Some(JSON), vec![], StatusCode::BAD_REQUEST, "empty body"),
        (
            "/events",
            Some(FORM),
            format!("event=ONCRMREQUISITEADD&{MEMBER}&data[FIELDS][ID]=%FF%FE").into_bytes(),
            StatusCode::BAD_REQUEST,
            "UTF-8",
        ),
        (
            "/events",
            Some(FORM),
            [b"event=ONCRMREQUISITEADD&data[FIELDS][ID]=\xff&".as_slice(), MEMBER.as_bytes()].concat(),
            StatusCode::BAD_REQUEST,
            "UTF-8",
        ),
        (
            "/events",
            Some(FORM),
            format!("event=ONCRMREQUISITEADD&{MEMBER}&data[FIELDS[ID]=27").into_bytes(),
            StatusCode::BAD_REQUEST,
            "data[FIELDS]",
        ),
        (
            "/events",
            Some(FORM),
            "event=ONCRMREQUISITEADD&auth[member_id=abc&data[FIELDS][ID]=27".into(),
            StatusCode::BAD_REQUEST,
            "auth",
        ),
        ("/events", Some(FORM), deep_key.into_bytes(), StatusCode::BAD_REQUEST, "form key"),
        ("/events", Some(FORM), nested_key.into_bytes(), StatusCode::BAD_REQUEST, "nesting"),
        ("/events", Some(FORM), five_mb.into_bytes(), StatusCode::PAYLOAD_TOO_LARGE, "too large"),
        ("/events", Some("text/plain"), b"event=X".to_vec(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "content type"),
        ("/events", None, b"event=X".to_vec(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "content type"),
        ("/events", Some(JSON), b"{\"event\":".to_vec(), StatusCode::BAD_REQUEST, "JSON"),
        ("/events", Some(JSON), b"[1,2]".to_vec(), StatusCode::BAD_REQUEST, "object"),
        (
            "/events",
            Some(FORM),
            http_build_query(&no_member).into_bytes(),
            StatusCode::BAD_REQUEST,
            "missing field `auth[member_id]`",
        ),
        (
            "/events",
            Some(JSON),
            no_event.to_string().into_bytes(),
            StatusCode::BAD_REQUEST,
            "missing field `event`",
        ),
        (
            "/events",
            Some(FORM),
            format!("event=ONCRMDEALRECURRINGEXPOSE&{MEMBER}&data[FIELDS][ID]=1").into_bytes(),
            StatusCode::BAD_REQUEST,
            "RECURRING_DEAL_ID",
        ),
        (
            "/placement",
            Some(FORM),
            b"PLACEMENT=CRM_DEAL_DETAIL_ACTIVITY&member_id=abc&DOMAIN=x.bitrix24.com&PLACEMENT_OPTIONS=%7Bnope".to_vec(),
            StatusCode::BAD_REQUEST,
            "PLACEMENT_OPTIONS",
        ),
        (
            "/install",
            Some(FORM),
            b"DOMAIN=x.bitrix24.com&member_id=abc".to_vec(),
            StatusCode::BAD_REQUEST,
            "AUTH_ID",
        ),
    ];
    for (path, ct, body, status, reason) in cases {
        let len = body.len();
        let a = ingress.http.post(path, ct, body).await.unwrap();
        assert_eq!(a.status, status, "{path} {ct:?} ({len} bytes): {}", a.body);
        assert!(
            a.body.contains(reason),
            "reason `{}` should mention `{reason}`",
            a.body
        );
        assert_eq!(
            a.body.trim_end().lines().count(),
            1,
            "one-line reason: {}",
            a.body
        );
        assert!(a.body.len() < 300, "short reason: {}", a.body);
    }
    assert!(
        ingress.work_messages().await.is_empty(),
        "nothing published"
    );
    let a = ingress.http.get("/events").await.unwrap();
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        ingress.http.get("/nowhere").await.unwrap().status,
        StatusCode::NOT_FOUND
    );
    // The process is still serving after all of that.
    assert_eq!(
        ingress.http.get("/healthz").await.unwrap().status,
        StatusCode::OK
    );
    ingress.finish().await;
}

#[tokio::test]
async fn reasons_never_echo_tokens() {
    let ingress = TestIngress::spawn("noecho", &[]).await;
    let mut bad = fixtures::deal_recurring_expose();
    bad["auth"]["member_id"] = "s6p6eclrvim6da22ft9ch94ekreb52lv!!".into();
    let a = ingress.post_form("/events", &bad).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(!a.body.contains("s6p6ecl"), "{}", a.body);
    ingress.finish().await;
}
