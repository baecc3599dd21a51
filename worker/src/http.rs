//! `/metrics`, `/healthz` and `/readyz` on WORKER_METRICS_ADDR.

use crate::metrics::WorkerMetrics;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub async fn serve(
    listener: TcpListener,
    metrics: WorkerMetrics,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
            () = stop.cancelled() => return,
        };
        let metrics = metrics.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = answer(req.uri().path(), &metrics, &ready);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(path: &str, metrics: &WorkerMetrics, ready: &AtomicBool) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => {
            let (ct, body) = b24_shared::metrics::render(&metrics.registry);
            (StatusCode::OK, ct, body)
        }
        "/healthz" => (StatusCode::OK, "text/plain".into(), b"ok\n".to_vec()),
        "/readyz" if ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "text/plain".into(), b"ready\n".to_vec())
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain".into(),
            b"not consuming\n".to_vec(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain".into(),
            b"not found\n".to_vec(),
        ),
    };
    let mut r = Response::new(Full::from(body));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(&content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}
