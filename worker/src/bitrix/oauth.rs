//! The OAuth refresh request. A refresh token is single-use and a refresh also kills
//! the access token issued with it, so this is only ever called by
//! [`super::session`] while it holds the portal's row lock.

use super::error::{B24Error, ErrorClass};
use b24_shared::Secret;
use serde::Deserialize;
use url::Url;

#[derive(Debug, Clone)]
pub struct OAuthApp {
    pub url: Url,
    pub client_id: Secret,
    pub client_secret: Secret,
}

/// What the OAuth server hands back.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenPair {
    pub access_token: Secret,
    pub refresh_token: Secret,
    #[serde(default, deserialize_with = "lenient_i64")]
    pub expires_in: Option<i64>,
    #[serde(default)]
    pub client_endpoint: Option<String>,
    #[serde(default)]
    pub server_endpoint: Option<String>,
    #[serde(default)]
    pub member_id: Option<String>,
}

fn lenient_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    })
}

pub async fn refresh(
    http: &reqwest::Client,
    app: &OAuthApp,
    refresh_token: &Secret,
) -> Result<TokenPair, B24Error> {
    let mut url = app.url.clone();
    url.query_pairs_mut()
        .append_pair("grant_type", "refresh_token")
        .append_pair("client_id", app.client_id.expose())
        .append_pair("client_secret", app.client_secret.expose())
        .append_pair("refresh_token", refresh_token.expose());
    let resp = http.get(url).send().await.map_err(|e| {
        let code = if e.is_timeout() {
            "TIMEOUT"
        } else {
            "NETWORK_ERROR"
        };
        // The URL carries the secrets: never let it into the message.
        B24Error::transient(code, "OAuth server unreachable")
    })?;
    let status = resp.status().as_u16();
    let bytes = resp
        .bytes()
        .await
        .map_err(|_| B24Error::transient("NETWORK_ERROR", "OAuth answer cut off"))?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| {
        let mut e = B24Error::from_answer(status, "NON_JSON_ANSWER", "OAuth answer is not JSON");
        if status >= 500 {
            e.class = ErrorClass::Transient;
        }
        e
    })?;
    if let Some(code) = json.get("error").and_then(|c| c.as_str()) {
        let desc = json
            .get("error_description")
            .and_then(|d| d.as_str())
            .unwrap_or("");
        let mut e = B24Error::from_answer(status, code, desc);
        if status >= 500 && e.class == ErrorClass::NotRetryable {
            e.class = ErrorClass::Transient;
        }
        return Err(e);
    }
    serde_json::from_value::<TokenPair>(json).map_err(|_| {
        B24Error::from_answer(status, "BAD_TOKEN_ANSWER", "OAuth answer lacks the tokens")
    })
}
