//! Bitrix24 error answers, classified once. Callers never match on codes: they ask
//! the class. The code and HTTP status travel with the error so a dead letter says
//! exactly what Bitrix24 answered; the description is Bitrix24's, never ours with a
//! token in it.

use std::fmt;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 500s, network errors, timeouts: retry with backoff, then a delayed requeue.
    Transient,
    /// 503 `QUERY_LIMIT_EXCEEDED`: the portal's leaky bucket overflowed.
    RateLimited,
    /// 429 `OPERATION_TIME_LIMIT`: this method's time budget is spent for a while.
    MethodPaused,
    /// 401 `expired_token` / `invalid_token`: refresh (or re-read) the tokens.
    NeedsRefresh,
    /// Permanent for this event or portal (`ACCESS_DENIED`, refresh `invalid_grant`…).
    Permanent,
    /// `PORTAL_DELETED`: the portal is gone, or closed for a while (self-hosted).
    PortalGone,
    /// `PAYMENT_REQUIRED`: the app's subscription lapsed; the portal's events wait.
    PaymentRequired,
    /// Ours: the portal cannot be called now (unpaid, needs a reinstall, closed for a
    /// while, its budget saturated). The message waits in a delay queue for
    /// `retry_after` without spending an attempt.
    Held,
    /// Anything else (`ERROR_METHOD_NOT_FOUND`, unknown codes, non-JSON): not retried.
    NotRetryable,
}

impl ErrorClass {
    /// Worth trying again later, spending an attempt.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Transient | Self::RateLimited | Self::MethodPaused | Self::NeedsRefresh
        )
    }
}

/// Classifies a Bitrix24 error code (seed 004's table and DESIGN.md's).
pub fn classify(code: &str) -> ErrorClass {
    match code {
        "QUERY_LIMIT_EXCEEDED" => ErrorClass::RateLimited,
        "OPERATION_TIME_LIMIT" => ErrorClass::MethodPaused,
        "expired_token" | "invalid_token" => ErrorClass::NeedsRefresh,
        "INTERNAL_SERVER_ERROR" | "ERROR_UNEXPECTED_ANSWER" | "NETWORK_ERROR" | "TIMEOUT" => {
            ErrorClass::Transient
        }
        "NO_AUTH_FOUND"
        | "INVALID_CREDENTIALS"
        | "insufficient_scope"
        | "user_access_error"
        | "ACCESS_DENIED"
        | "OVERLOAD_LIMIT"
        | "invalid_grant"
        | "invalid_client"
        | "NOT_INSTALLED"
        | "APPLICATION_NOT_FOUND" => ErrorClass::Permanent,
        "PORTAL_DELETED" => ErrorClass::PortalGone,
        "PAYMENT_REQUIRED" => ErrorClass::PaymentRequired,
        _ => ErrorClass::NotRetryable,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct B24Error {
    pub class: ErrorClass,
    /// Bitrix24's code (`QUERY_LIMIT_EXCEEDED`), or ours for what it did not send
    /// (`NETWORK_ERROR`, `TIMEOUT`, `NON_JSON_ANSWER`, `ENDPOINT_NOT_ALLOWED`).
    pub code: String,
    pub status: Option<u16>,
    pub description: String,
    /// For `MethodPaused`/`RateLimited`: how long to hold off, when known.
    pub retry_after: Option<Duration>,
}

impl B24Error {
    pub fn from_answer(status: u16, code: &str, description: &str) -> Self {
        let code = if code.is_empty() {
            // Method-level errors come as `"error": ""` with a description
            // ("Not found", "Access denied."): not retryable.
            "METHOD_ERROR"
        } else {
            code
        };
        Self {
            class: classify(code),
            code: code.chars().take(80).collect(),
            status: Some(status),
            description: description.chars().take(200).collect(),
            retry_after: None,
        }
    }

    pub fn ours(class: ErrorClass, code: &str, description: impl Into<String>) -> Self {
        Self {
            class,
            code: code.into(),
            status: None,
            description: description.into(),
            retry_after: None,
        }
    }

    pub fn transient(code: &str, description: impl Into<String>) -> Self {
        Self::ours(ErrorClass::Transient, code, description)
    }

    /// The portal cannot be called for `after`: its messages wait without failing.
    pub fn held(code: &str, description: impl Into<String>, after: Duration) -> Self {
        let mut e = Self::ours(ErrorClass::Held, code, description);
        e.retry_after = Some(after);
        e
    }
}

impl fmt::Display for B24Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "Bitrix24 answered {s} {}", self.code)?,
            None => write!(f, "{}", self.code)?,
        }
        if !self.description.is_empty() {
            write!(f, ": {}", self.description)?;
        }
        Ok(())
    }
}

impl std::error::Error for B24Error {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code of seed 004's table and DESIGN.md lands in its class.
    #[test]
    fn every_documented_code_is_classified() {
        use ErrorClass::*;
        let table = [
            ("INTERNAL_SERVER_ERROR", Transient),
            ("ERROR_UNEXPECTED_ANSWER", Transient),
            ("QUERY_LIMIT_EXCEEDED", RateLimited),
            ("ERROR_BATCH_METHOD_NOT_ALLOWED", NotRetryable),
            ("ERROR_BATCH_LENGTH_EXCEEDED", NotRetryable),
            ("NO_AUTH_FOUND", Permanent),
            ("INVALID_REQUEST", NotRetryable),
            ("OVERLOAD_LIMIT", Permanent),
            ("ACCESS_DENIED", Permanent),
            ("INVALID_CREDENTIALS", Permanent),
            ("ERROR_MANIFEST_IS_NOT_AVAILABLE", NotRetryable),
            ("insufficient_scope", Permanent),
            ("expired_token", NeedsRefresh),
            ("invalid_token", NeedsRefresh),
            ("user_access_error", Permanent),
            ("PORTAL_DELETED", PortalGone),
            ("OPERATION_TIME_LIMIT", MethodPaused),
            ("PAYMENT_REQUIRED", PaymentRequired),
            ("invalid_grant", Permanent),
            ("ERROR_METHOD_NOT_FOUND", NotRetryable),
            ("SOMETHING_NEW", NotRetryable),
        ];
        for (code, class) in table {
            assert_eq!(classify(code), class, "{code}");
        }
    }

    #[test]
    fn method_errors_without_a_code_are_not_retried() {
        let e = B24Error::from_answer(400, "", "Access denied.");
        assert_eq!(e.code, "METHOD_ERROR");
        assert_eq!(e.class, ErrorClass::NotRetryable);
        assert_eq!(
            e.to_string(),
            "Bitrix24 answered 400 METHOD_ERROR: Access denied."
        );
    }
}
