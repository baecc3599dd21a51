//! One REST request to a portal: `client_endpoint + method` with the token in the body.
//! This layer knows nothing of portals or retries ([`super::session`] does); it only
//! refuses endpoints outside the allowlist, follows redirects that stay inside it, and
//! turns every answer into a result or a classified [`B24Error`].

use super::error::{B24Error, ErrorClass};
use super::hosts::AllowedHosts;
use super::metrics::B24Metrics;
use b24_shared::Secret;
use serde_json::{Map, Value};
use std::time::Duration;
use url::Url;

/// A successful answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub result: Value,
    /// Bitrix24's `time` block (`operating`, `operating_reset_at`…), when present.
    pub time: Option<Value>,
    /// Set when the portal answered with a redirect we followed: its new endpoint.
    pub moved_to: Option<Url>,
    /// A list method's `next`: the `start` of the following page, when there is one.
    pub next: Option<u64>,
}

#[derive(Clone)]
pub struct RestClient {
    http: reqwest::Client,
    allowed: AllowedHosts,
    metrics: B24Metrics,
}

/// Redirects followed for one call before giving up.
const MAX_REDIRECTS: usize = 3;

impl RestClient {
    pub fn new(allowed: AllowedHosts, timeout: Duration, metrics: B24Metrics) -> Self {
        let http = reqwest::Client::builder()
            // Redirects are followed by hand: each target must pass the allowlist.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(8)
            .user_agent("b24-pipeline")
            .build()
            .unwrap_or_default();
        Self {
            http,
            allowed,
            metrics,
        }
    }

    pub fn allowed_hosts(&self) -> &AllowedHosts {
        &self.allowed
    }

    pub fn metrics(&self) -> &B24Metrics {
        &self.metrics
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Checks `endpoint` against the allowlist and normalizes it to end in `/`.
    pub fn endpoint(&self, endpoint: &str) -> Result<Url, B24Error> {
        let mut url = self.allowed.check(endpoint).map_err(|e| {
            B24Error::ours(ErrorClass::Permanent, "ENDPOINT_NOT_ALLOWED", e.to_string())
        })?;
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        Ok(url)
    }

    /// Calls `method` with `params` (a JSON object) and the access token.
    pub async fn call(
        &self,
        endpoint: &Url,
        token: &Secret,
        method: &str,
        params: &Value,
    ) -> Result<Answer, B24Error> {
        if method.is_empty()
            || !method
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
        {
            return Err(B24Error::ours(
                ErrorClass::NotRetryable,
                "BAD_METHOD",
                "method name must be letters, digits, dots and underscores",
            ));
        }
        let mut body = match params {
            Value::Object(o) => o.clone(),
            Value::Null => Map::new(),
            _ => {
                return Err(B24Error::ours(
                    ErrorClass::NotRetryable,
                    "BAD_PARAMS",
                    "params must be a JSON object",
                ))
            }
        };
        body.insert("auth".into(), Value::String(token.expose().to_string()));
        let body = Value::Object(body);

        let mut base = endpoint.clone();
        let mut moved_to = None;
        for _ in 0..=MAX_REDIRECTS {
            let url = base.join(method).map_err(|_| {
                B24Error::ours(
                    ErrorClass::NotRetryable,
                    "BAD_ENDPOINT",
                    "cannot join method",
                )
            })?;
            let timer = std::time::Instant::now();
            let sent = self.http.post(url.clone()).json(&body).send().await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    self.metrics.observe(method, "network", timer.elapsed());
                    let code = if e.is_timeout() {
                        "TIMEOUT"
                    } else {
                        "NETWORK_ERROR"
                    };
                    // reqwest's message may include the URL but never the body.
                    return Err(B24Error::transient(code, without_url(&e)));
                }
            };
            let status = resp.status().as_u16();
            if resp.status().is_redirection() {
                self.metrics
                    .observe(method, &status.to_string(), timer.elapsed());
                let location = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| url.join(l).ok());
                let Some(location) = location else {
                    return Err(B24Error::from_answer(
                        status,
                        "BAD_REDIRECT",
                        "redirect without a valid Location",
                    ));
                };
                // The new endpoint is the Location without the method at its end.
                let new_base = match location.as_str().strip_suffix(method) {
                    Some(b) => Url::parse(b).ok(),
                    None => location.join("./").ok(),
                };
                match new_base.filter(|u| self.allowed.allows(u)) {
                    Some(u) => {
                        tracing::info!(from = %base.host_str().unwrap_or(""), to = %u.host_str().unwrap_or(""), "portal moved; following");
                        base = u.clone();
                        moved_to = Some(u);
                        continue;
                    }
                    None => {
                        return Err(B24Error::ours(
                            ErrorClass::Permanent,
                            "REDIRECT_NOT_ALLOWED",
                            format!(
                                "redirect to `{}` is outside B24_ALLOWED_HOSTS",
                                location.host_str().unwrap_or("")
                            ),
                        ))
                    }
                }
            }
            let bytes = resp.bytes().await;
            self.metrics
                .observe(method, &status.to_string(), timer.elapsed());
            let bytes = bytes.map_err(|e| B24Error::transient("NETWORK_ERROR", without_url(&e)))?;
            return parse_answer(status, &bytes).map(|(result, time, next)| Answer {
                result,
                time,
                moved_to,
                next,
            });
        }
        Err(B24Error::ours(
            ErrorClass::NotRetryable,
            "TOO_MANY_REDIRECTS",
            format!("more than {MAX_REDIRECTS} redirects"),
        ))
    }
}

fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "");
    }
    s.chars().take(200).collect()
}

/// Turns a status and body into the result or a classified error.
pub fn parse_answer(
    status: u16,
    bytes: &[u8],
) -> Result<(Value, Option<Value>, Option<u64>), B24Error> {
    let Ok(json) = serde_json::from_slice::<Value>(bytes) else {
        // A gateway in front of the portal answers HTML while it is sick: transient.
        // Anything else non-JSON is not something retrying will fix.
        let class = if matches!(status, 502..=504) {
            ErrorClass::Transient
        } else {
            ErrorClass::NotRetryable
        };
        let mut e = B24Error::from_answer(status, "NON_JSON_ANSWER", "answer is not JSON");
        e.class = class;
        return Err(e);
    };
    if let Some(code) = json.get("error") {
        let code = code.as_str().unwrap_or("UNKNOWN");
        let description = json
            .get("error_description")
            .and_then(Value::as_str)
            .unwrap_or("");
        return Err(B24Error::from_answer(status, code, description));
    }
    if !(200..300).contains(&status) {
        return Err(B24Error::from_answer(
            status,
            "UNEXPECTED_STATUS",
            "error status without an error code",
        ));
    }
    match json {
        Value::Object(mut o) => {
            let time = o.remove("time");
            let next = o.get("next").and_then(|n| match n {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            });
            match o.remove("result") {
                Some(result) => Ok((result, time, next)),
                None => Err(B24Error::from_answer(
                    status,
                    "NO_RESULT",
                    "answer has no `result`",
                )),
            }
        }
        _ => Err(B24Error::from_answer(
            status,
            "NO_RESULT",
            "answer is not an object",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_into_result_or_classified_error() {
        let (r, t, next) = parse_answer(
            200,
            br#"{"result":{"ID":"1"},"time":{"operating":0.5},"next":50}"#,
        )
        .unwrap();
        assert_eq!(next, Some(50));
        assert_eq!(r["ID"], "1");
        assert_eq!(t.unwrap()["operating"], 0.5);
        let e = parse_answer(
            503,
            br#"{"error":"QUERY_LIMIT_EXCEEDED","error_description":"Too many requests"}"#,
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::RateLimited);
        assert_eq!(e.status, Some(503));
        let e = parse_answer(401, br#"{"error":"expired_token"}"#).unwrap_err();
        assert_eq!(e.class, ErrorClass::NeedsRefresh);
        let e = parse_answer(200, b"<html>").unwrap_err();
        assert_eq!(
            (e.class, e.code.as_str()),
            (ErrorClass::NotRetryable, "NON_JSON_ANSWER")
        );
        let e = parse_answer(502, b"<html>bad gateway").unwrap_err();
        assert_eq!(e.class, ErrorClass::Transient);
        let e = parse_answer(400, br#"{"error":"","error_description":"Not found"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Bitrix24 answered 400 METHOD_ERROR: Not found"
        );
    }
}
