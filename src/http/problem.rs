//! Every error a client can see, and its one mapping to a status and an RFC 9457
//! `application/problem+json` body with a stable `code`. 5xx bodies say nothing
//! internal; the cause is logged once, here.

use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::backend::{StoreError, WriteError};
use crate::domain::FieldError;
use crate::engine::Refusal;
use crate::signing::SignatureFailure;

/// Seconds a client should wait before retrying after a `503`.
pub const RETRY_AFTER_SECONDS: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("signature: {0}")]
    Signature(SignatureFailure),
    #[error("admin token missing or wrong")]
    AdminUnauthorized,
    #[error("body larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("body not received in time")]
    BodyTimeout,
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("invalid field {}: {}", .0.field, .0.detail)]
    Invalid(FieldError),
    #[error("duplicate_conflict")]
    DuplicateConflict { txn_id: String, conversion_id: String },
    #[error("refused: {}", .0.detail)]
    Refused(Refusal),
    #[error("storage: {0}")]
    Storage(StoreError),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    #[error("token mode from an IP outside the merchant's allow-list")]
    TokenIpNotAllowed,
    #[error("rate limited for {0:?}")]
    RateLimited(std::time::Duration),
    /// A bug: a handler panicked. The request id is in the log line that says why.
    #[error("internal error")]
    Internal,
}

impl From<crate::domain::json::JsonError> for ApiError {
    fn from(e: crate::domain::json::JsonError) -> Self {
        match e {
            crate::domain::json::JsonError::Malformed(d) => ApiError::MalformedJson(d),
            crate::domain::json::JsonError::Invalid(f) => ApiError::Invalid(f),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Storage(e)
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Store(s) => ApiError::Storage(s),
            WriteError::Refused(r) => ApiError::Refused(r),
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::Invalid(e)
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    code: &'a str,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conversion_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    current_status: Option<&'a str>,
}

impl ApiError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Signature(_) => "signature_invalid",
            ApiError::AdminUnauthorized => "unauthorized",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::BodyTimeout => "body_timeout",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::Invalid(_) => "invalid_field",
            ApiError::DuplicateConflict { .. } => "duplicate_conflict",
            ApiError::Refused(r) => r.code,
            ApiError::Storage(_) => "storage_unavailable",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidQuery(_) => "invalid_query",
            ApiError::TokenIpNotAllowed => "ip_not_allowed",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::Internal => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Signature(_) | ApiError::AdminUnauthorized => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MalformedJson(_) | ApiError::BadRequest(_) | ApiError::InvalidQuery(_) => StatusCode::BAD_REQUEST,
            ApiError::TokenIpNotAllowed => StatusCode::FORBIDDEN,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::DuplicateConflict { .. } => StatusCode::CONFLICT,
            ApiError::Refused(r) if r.conflict => StatusCode::CONFLICT,
            ApiError::Refused(r) if r.code == "not_found" || r.code == "merchant_not_found" => StatusCode::NOT_FOUND,
            ApiError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn title_and_detail(&self) -> (&'static str, String) {
        match self {
            ApiError::NotFound => ("Not found", "Nothing is here. Check the path and the id.".into()),
            ApiError::MethodNotAllowed => ("Method not allowed", "This path does not take that method.".into()),
            // One fixed body for every signature failure: the reason is in metrics, not here.
            ApiError::Signature(_) => (
                "Invalid signature",
                "The request is not signed with a valid Standard Webhooks signature for this sender, or its timestamp is outside the allowed window.".into(),
            ),
            ApiError::AdminUnauthorized => ("Unauthorized", "Send Authorization: Bearer <admin token>.".into()),
            ApiError::PayloadTooLarge(limit) => ("Payload too large", format!("The body must be at most {limit} bytes.")),
            ApiError::BodyTimeout => ("Request timeout", "The body was not received in time.".into()),
            ApiError::UnsupportedMediaType => ("Unsupported media type", "Send Content-Type: application/json.".into()),
            ApiError::MalformedJson(d) => ("Malformed JSON", format!("The body is not valid JSON: {d}")),
            ApiError::Invalid(e) => ("Invalid field", format!("{}: {}", e.field, e.detail)),
            ApiError::DuplicateConflict { txn_id, .. } => (
                "Duplicate with different content",
                format!("txn_id {txn_id} was already recorded with a different amount, currency, event or attribution keys; the stored conversion is unchanged. Use a new txn_id or an adjustment."),
            ),
            ApiError::Refused(r) => ("Refused", r.detail.clone()),
            ApiError::Storage(_) => ("Service unavailable", "Storage is not accepting writes right now. Nothing was stored; retry later with the same request.".into()),
            ApiError::BadRequest(d) => ("Bad request", d.clone()),
            ApiError::InvalidQuery(d) => ("Invalid query", format!("The query string cannot be read: {d}.")),
            ApiError::RateLimited(wait) => (
                "Too many requests",
                format!("Slow down: retry after {} s.", crate::limits::retry_after_secs(*wait)),
            ),
            ApiError::Internal => (
                "Internal error",
                "tally failed to answer this request. A write it made is kept: retry with the same request to get its answer, and quote the x-request-id header when reporting it.".into(),
            ),
            ApiError::TokenIpNotAllowed => (
                "Forbidden",
                "Postback tokens are accepted only from the merchant's allowed_ips; sign the URL instead.".into(),
            ),
        }
    }

    fn problem(&self) -> Problem<'_> {
        let (title, detail) = self.title_and_detail();
        let field = match self {
            ApiError::Invalid(e) => Some(e.field.as_str()),
            ApiError::Refused(r) => r.field,
            _ => None,
        };
        let conversion_id = match self {
            ApiError::DuplicateConflict { conversion_id, .. } => Some(conversion_id.as_str()),
            _ => None,
        };
        Problem {
            kind: format!("/problems/{}", self.code()),
            title,
            status: self.status().as_u16(),
            code: self.code(),
            detail,
            field,
            conversion_id,
            current_status: match self {
                ApiError::Refused(r) => r.current_status,
                _ => None,
            },
        }
    }

    /// The problem body as JSON, for answers that embed problems (batch items).
    pub fn problem_json(&self) -> serde_json::Value {
        serde_json::to_value(self.problem()).unwrap_or_default()
    }

    /// The response. Storage errors are logged here, once.
    pub fn into_response(self) -> Response<super::Body> {
        if let ApiError::Storage(e) = &self {
            tracing::error!(error = %e, "request failed on storage");
        }
        let status = self.status();
        let body = self.problem();
        let mut resp = Response::new(super::full(serde_json::to_vec(&body).unwrap_or_default()));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        if let ApiError::RateLimited(wait) = &self {
            h.insert(header::RETRY_AFTER, HeaderValue::from(crate::limits::retry_after_secs(*wait)));
        }
        if status == StatusCode::UNAUTHORIZED && matches!(self, ApiError::AdminUnauthorized) {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE || status == StatusCode::REQUEST_TIMEOUT {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}
