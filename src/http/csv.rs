//! CSV for exports and reports: RFC 4180 rows (a cell with a comma, quote or line break
//! is quoted, its quotes doubled) and SPEC 5.5's guard against formula injection: a cell
//! that starts with `=`, `+`, `-`, `@`, a tab or a carriage return is prefixed with `'`,
//! so a spreadsheet shows it as text instead of running it.

use http::{header, HeaderValue, Response, StatusCode};

use super::Body;

/// Appends one cell, guarded and quoted as needed.
pub fn cell(out: &mut String, value: &str) {
    let guard = value.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let quote = value.contains([',', '"', '\r', '\n']);
    if quote {
        out.push('"');
    }
    if guard {
        out.push('\'');
    }
    if quote {
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

/// Appends one row and its line break (CRLF, as RFC 4180 says).
pub fn row<'a>(out: &mut String, cells: impl IntoIterator<Item = &'a str>) {
    for (i, c) in cells.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        cell(out, c);
    }
    out.push_str("\r\n");
}

/// A whole CSV answer, offered as a download named `filename`.
pub fn response(body: String, filename: &str) -> Response<Body> {
    let mut resp = Response::new(super::full(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_quoted_and_formulas_defused() {
        let cases = [
            ("plain", "plain"),
            ("a,b", "\"a,b\""),
            ("say \"hi\"", "\"say \"\"hi\"\"\""),
            ("=HYPERLINK(\"x\")", "\"'=HYPERLINK(\"\"x\"\")\""),
            ("+1", "'+1"),
            ("-5.00", "'-5.00"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("\rx", "\"'\rx\""),
            ("line\nbreak", "\"line\nbreak\""),
            ("", ""),
        ];
        for (input, want) in cases {
            let mut out = String::new();
            cell(&mut out, input);
            assert_eq!(out, want, "{input:?}");
        }
        let mut out = String::new();
        row(&mut out, ["a", "b,c"]);
        assert_eq!(out, "a,\"b,c\"\r\n");
    }
}
