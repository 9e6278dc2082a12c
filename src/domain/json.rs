//! Request bodies: JSON objects into typed values, with the failing field named
//! (`rules[1].percent`) so that a client developer can act on the error.

use super::FieldError;

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not JSON at all (`400 malformed_json`).
    #[error("{0}")]
    Malformed(String),
    /// JSON that does not fit the expected shape (`422 invalid_field`).
    #[error(transparent)]
    Invalid(FieldError),
}

/// Parses a request body into `T`, naming the failing field (`rules[1].percent`).
/// Only objects are accepted: serde would otherwise also read a struct from an array.
///
/// # Errors
/// [`JsonError::Malformed`] for text that is not JSON, [`JsonError::Invalid`] for JSON that
/// does not fit `T`.
pub fn parse_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, JsonError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
            return Err(JsonError::Invalid(FieldError::new("body", "must be a JSON object")));
        }
        _ => return Err(JsonError::Malformed("expected a JSON object".into())),
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if !inner.is_data() {
            return JsonError::Malformed(inner.to_string());
        }
        let message = inner.to_string();
        // Unknown and duplicate fields are reported at their parent; name the field itself.
        let named = message
            .split('`')
            .nth(1)
            .filter(|_| ["unknown field", "duplicate field", "missing field"].iter().any(|p| message.starts_with(p)));
        // serde_path_to_error already ends the path with an unknown field, not with a
        // missing or duplicated one.
        let field = match (path.as_str(), named) {
            (p, Some(n)) if p == n || p.ends_with(&format!(".{n}")) => p.to_string(),
            (".", Some(n)) => n.to_string(),
            (p, Some(n)) => format!("{p}.{n}"),
            (".", None) => "body".to_string(),
            (p, None) => p.to_string(),
        };
        // An empty key (`{"": 1}`) leaves nothing to name but the body.
        let field = if field.is_empty() || field.ends_with('.') { "body".to_string() } else { field };
        let detail = message.split(" at line ").next().unwrap_or(&message).to_string();
        JsonError::Invalid(FieldError::new(field, detail))
    })?;
    de.end().map_err(|e| JsonError::Malformed(e.to_string()))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::conversion::ConversionBody;

    /// Found by the `conversion_json` fuzz target: an empty key named no field at all.
    #[test]
    fn an_unknown_empty_key_is_reported_on_the_body() {
        let body = br#"{"txn_id":"o(d_1","event":"sale","amount":"-50sale",""abc"}"#;
        let Err(JsonError::Invalid(e)) = parse_object::<ConversionBody>(body) else { panic!("refused as invalid") };
        assert_eq!(e.field, "body");
        let Err(JsonError::Invalid(e)) = parse_object::<ConversionBody>(br#"{"txn_id":"a","":1}"#) else { panic!() };
        assert_eq!(e.field, "body");
    }

    #[test]
    fn unknown_and_nested_fields_are_named() {
        let Err(JsonError::Invalid(e)) = parse_object::<ConversionBody>(br#"{"txn_id":"a","amout":"1"}"#) else {
            panic!()
        };
        assert_eq!(e.field, "amout");
        let Err(JsonError::Malformed(_)) = parse_object::<ConversionBody>(b"{\"txn_id\":") else { panic!() };
        let Err(JsonError::Invalid(e)) = parse_object::<ConversionBody>(b"[1]") else { panic!() };
        assert_eq!(e.field, "body");
    }
}
