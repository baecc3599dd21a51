//! The OAuth refresh request, against the portal's own authorization server. Bitrix24
//! runs more than one (regions): each portal's `server_endpoint` names its own, and
//! `B24_OAUTH_URL` is only the fallback for portals that never told us theirs.
//!
//! A refresh token is single-use and a refresh also kills the access token issued with
//! it, so a stored portal's refresh is only ever made by [`super::session`] while it
//! holds the portal's row lock; an installation's proof refreshes tokens nobody else
//! has stored yet.

use super::error::{B24Error, ErrorClass};
use super::hosts::AllowedHosts;
use b24_shared::event::MemberId;
use b24_shared::Secret;
use serde::Deserialize;
use url::Url;

#[derive(Debug, Clone)]
pub struct OAuthApp {
    /// `B24_OAUTH_URL`: the token endpoint used when a portal's own is unknown.
    pub fallback_url: Url,
    pub client_id: Secret,
    pub client_secret: Secret,
}

impl OAuthApp {
    /// The token endpoint for a portal's `server_endpoint`
    /// (`https://oauth.bitrix.info/rest/` → `https://oauth.bitrix.info/oauth/token/`),
    /// which must be in the allowlist; the fallback when there is none.
    pub fn token_url(
        &self,
        server_endpoint: Option<&str>,
        allowed: &AllowedHosts,
    ) -> Result<Url, B24Error> {
        let Some(server) = server_endpoint.filter(|s| !s.trim().is_empty()) else {
            return Ok(self.fallback_url.clone());
        };
        let server = allowed.check(server).map_err(|e| {
            B24Error::ours(
                ErrorClass::Permanent,
                "SERVER_ENDPOINT_NOT_ALLOWED",
                format!("authorization server: {e}"),
            )
        })?;
        server.join("/oauth/token/").map_err(|_| {
            B24Error::ours(
                ErrorClass::Permanent,
                "SERVER_ENDPOINT_NOT_ALLOWED",
                "authorization server is not a base URL",
            )
        })
    }
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
    /// The app's status on the portal (`L` local, `F` free, `P` paid…).
    #[serde(default)]
    pub status: Option<String>,
}

impl TokenPair {
    /// The answer must be about the portal we asked for: a refresh that answers for
    /// another member_id (or for none) is not stored.
    pub fn check_member(&self, member_id: &MemberId) -> Result<(), B24Error> {
        match self.member_id.as_deref() {
            Some(m) if m == member_id.as_str() => Ok(()),
            Some(_) => Err(B24Error::ours(
                ErrorClass::Permanent,
                "REFRESH_MEMBER_MISMATCH",
                "the authorization server answered for another portal",
            )),
            None => Err(B24Error::ours(
                ErrorClass::Permanent,
                "REFRESH_MEMBER_MISSING",
                "the authorization server's answer names no portal",
            )),
        }
    }
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
    token_url: &Url,
    refresh_token: &Secret,
) -> Result<TokenPair, B24Error> {
    let mut url = token_url.clone();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> OAuthApp {
        OAuthApp {
            fallback_url: Url::parse("https://oauth.bitrix.info/oauth/token/").unwrap(),
            client_id: Secret::new("id"),
            client_secret: Secret::new("secret"),
        }
    }

    #[test]
    fn each_portal_refreshes_at_its_own_allowed_server() {
        let allowed =
            AllowedHosts::parse("oauth.bitrix.info,oauth.bitrix24.tech,http://127.0.0.1:*")
                .unwrap();
        let a = app();
        assert_eq!(
            a.token_url(Some("https://oauth.bitrix24.tech/rest/"), &allowed)
                .unwrap()
                .as_str(),
            "https://oauth.bitrix24.tech/oauth/token/"
        );
        assert_eq!(
            a.token_url(Some("http://127.0.0.1:4000/rest/"), &allowed)
                .unwrap()
                .as_str(),
            "http://127.0.0.1:4000/oauth/token/"
        );
        assert_eq!(
            a.token_url(None, &allowed).unwrap().as_str(),
            "https://oauth.bitrix.info/oauth/token/"
        );
        let e = a
            .token_url(Some("https://evil.example/rest/"), &allowed)
            .unwrap_err();
        assert_eq!(e.code, "SERVER_ENDPOINT_NOT_ALLOWED");
    }

    #[test]
    fn an_answer_for_another_portal_is_refused() {
        let pair: TokenPair = serde_json::from_value(serde_json::json!({
            "access_token": "a", "refresh_token": "r", "member_id": "m2"
        }))
        .unwrap();
        let m1 = MemberId::parse("m1").unwrap();
        assert_eq!(
            pair.check_member(&m1).unwrap_err().code,
            "REFRESH_MEMBER_MISMATCH"
        );
        assert!(pair.check_member(&MemberId::parse("m2").unwrap()).is_ok());
    }
}
