//! Intake cannot be held hostage: connections that send a body slowly, dribble their
//! headers or sit idle are ended, and those from one address cannot take the slots
//! every other client needs. Loopback routes all of 127/8, so an "attacker" binds its
//! sockets to 127.0.0.2 while genuine traffic comes from 127.0.0.1.

use b24_tests::fixtures;
use b24_tests::http::{HttpClient, FORM};
use b24_tests::phpform::http_build_query;
use b24_tests::spawn::TestIngress;
use http::StatusCode;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Headers that promise a 64 KiB body, which never comes.
const SLOW_HEAD: &str = "POST /events HTTP/1.1\r\nHost: ingress\r\n\
Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 65536\r\n\r\n";

/// A connection from `from`, any 127/8 address.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Everything the server sent until it closed the connection, or `None` if it is
/// still open after `within`.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn slow_bodies_from_one_address_leave_room_for_everyone_else() {
    // The reported attack: 50 slots, and the per-address cap left at its default (an
    // eighth of the slots: 6).
    let ingress = TestIngress::spawn(
        "hostage",
        &[
            ("INGRESS_MAX_CONNECTIONS", "50"),
            ("INGRESS_REQUEST_TIMEOUT_MS", "3000"),
        ],
    )
    .await;
    // As many connections as the ingress has slots, each promising a body it never sends.
    let mut attackers = Vec::new();
    for _ in 0..50 {
        let mut s = connect_from("127.0.0.2", ingress.addr).await;
        s.write_all(SLOW_HEAD.as_bytes()).await.unwrap();
        attackers.push(s);
    }
    let attack_started = Instant::now();

    // Genuine events from another address are answered promptly all the while, each
    // on a connection of its own as Bitrix24 sends them.
    let mut slowest = Duration::ZERO;
    for id in 1..=20 {
        let sent = Instant::now();
        let fresh = HttpClient::new(ingress.addr);
        let body = http_build_query(&fixtures::requisite_add_numbered(id));
        let a = tokio::time::timeout(
            Duration::from_secs(2),
            fresh.post("/events", Some(FORM), body),
        )
        .await
        .expect("a genuine event is answered within 2 s while slow bodies are held")
        .unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        slowest = slowest.max(sent.elapsed());
        assert!(slowest < Duration::from_secs(1), "answered in {slowest:?}");
    }
    eprintln!("20 genuine events during the attack, the slowest answered in {slowest:?}");
    assert!(
        attack_started.elapsed() < Duration::from_secs(3),
        "the genuine events went through while the slow bodies were still held"
    );

    // Six of the slow connections were served and got 408 once the request deadline
    // passed; the other 44 were turned away at once by the per-address cap (a 503, or
    // a reset when the refusal crossed their request on the wire).
    let mut timed_out = 0;
    let mut refused = 0;
    for mut s in attackers {
        let answer = until_closed(&mut s, Duration::from_secs(8))
            .await
            .expect("every slow connection is ended");
        if answer.starts_with("HTTP/1.1 408") {
            let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
            assert!(body.contains("request body"), "reason: {body:?}");
            assert_eq!(body.trim_end().lines().count(), 1, "one line: {body:?}");
            assert!(
                attack_started.elapsed() >= Duration::from_millis(2500),
                "408 only after the deadline"
            );
            timed_out += 1;
        } else {
            assert!(
                answer.is_empty() || answer.starts_with("HTTP/1.1 503"),
                "refused connection got {answer:?}"
            );
            refused += 1;
        }
    }
    assert_eq!((timed_out, refused), (6, 44));
    let m = ingress.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"b24_ingress_rejections_total{reason="request_timeout"}"#
        ),
        6,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"b24_ingress_rejections_total{reason="client_connections"}"#
        ),
        44,
        "{m}"
    );
    assert_eq!(
        ingress.work_messages().await.len(),
        20,
        "only genuine events"
    );
    ingress.finish().await;
}

#[tokio::test]
async fn a_request_whose_body_is_late_gets_408_and_a_slow_but_timely_one_gets_200() {
    let ingress = TestIngress::spawn(
        "late-body",
        &[
            ("INGRESS_REQUEST_TIMEOUT_MS", "1500"),
            ("INGRESS_HEADER_TIMEOUT_MS", "5000"),
        ],
    )
    .await;
    let body = http_build_query(&fixtures::requisite_add());
    let head = format!(
        "POST /events HTTP/1.1\r\nHost: ingress\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );

    // Part of the body, then nothing.
    let mut s = connect_from("127.0.0.1", ingress.addr).await;
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body.as_bytes()[..10]).await.unwrap();
    let sent = Instant::now();
    let answer = until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("the late request is answered and closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        (Duration::from_millis(1300)..Duration::from_secs(3)).contains(&sent.elapsed()),
        "after the deadline: {:?}",
        sent.elapsed()
    );

    // The deadline covers the whole request: headers dribbled for most of it, then a
    // body that would each have been in time on its own.
    let mut s = connect_from("127.0.0.1", ingress.addr).await;
    let sent = Instant::now();
    for line in head.split_inclusive("\r\n") {
        s.write_all(line.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for chunk in body.as_bytes().chunks(body.len() / 4 + 1) {
        if s.write_all(chunk).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let answer = until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("answered and closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(sent.elapsed() < Duration::from_secs(4));

    // A body sent in pieces that all arrive before the deadline is fine.
    let mut s = connect_from("127.0.0.1", ingress.addr).await;
    s.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.as_bytes().chunks(body.len() / 3 + 1) {
        s.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        ingress.work_messages().await.len(),
        1,
        "only the timely one"
    );
    ingress.finish().await;
}

#[tokio::test]
async fn dribbled_headers_and_idle_keep_alive_connections_are_closed() {
    let ingress = TestIngress::spawn(
        "slowloris",
        &[
            ("INGRESS_HEADER_TIMEOUT_MS", "1000"),
            ("INGRESS_REQUEST_TIMEOUT_MS", "10000"),
        ],
    )
    .await;
    // A header line every 200 ms, never the blank line that ends them.
    let mut s = connect_from("127.0.0.2", ingress.addr).await;
    s.write_all(b"POST /events HTTP/1.1\r\n").await.unwrap();
    let started = Instant::now();
    loop {
        if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
            break;
        }
        let mut b = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => panic!("unexpected answer {:?}", String::from_utf8_lossy(&b[..n])),
            Err(_) => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "a connection dribbling its headers is closed by the header timeout"
        );
    }
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A keep-alive connection that goes quiet after its answer is closed too.
    let mut s = connect_from("127.0.0.2", ingress.addr).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: ingress\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let answer = until_closed(&mut s, Duration::from_secs(4))
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "kept alive until the timeout: {:?}",
        started.elapsed()
    );
    ingress.finish().await;
}
