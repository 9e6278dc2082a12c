//! The pieces of tally's compact binary records (clicks, ledger entries, balances, partner
//! months): texts as a little-endian `u16` length and their bytes, `u16::MAX` for an
//! absent text, and a reader that takes a record apart front to back.

/// Marks an absent text (no kept text is this long).
pub const NO_TEXT: u16 = u16::MAX;

/// Writes what [`Reader::text`] reads. Every kept text (ids, IPs, user agents, subs, notes)
/// is far shorter than the marker; a longer one would be cut to `NO_TEXT - 1` bytes.
pub fn put_text(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(t) => {
            let len = u16::try_from(t.len()).unwrap_or(NO_TEXT - 1).min(NO_TEXT - 1);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&t.as_bytes()[..usize::from(len)]);
        }
        None => out.extend_from_slice(&NO_TEXT.to_le_bytes()),
    }
}

/// Reads a binary record front to back; `None` when it is cut short or a text is not UTF-8.
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader(bytes)
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    /// A little-endian `i64`.
    pub fn i64(&mut self) -> Option<i64> {
        self.array().map(i64::from_le_bytes)
    }

    /// A `u16` length and UTF-8 bytes; `Some(None)` for an absent text.
    pub fn text(&mut self) -> Option<Option<&'a str>> {
        let len = u16::from_le_bytes(self.array()?);
        if len == NO_TEXT {
            return Some(None);
        }
        std::str::from_utf8(self.take(usize::from(len))?).ok().map(Some)
    }

    /// A present text parsed by `parse`.
    pub fn id<T>(&mut self, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        parse(self.text()??).ok()
    }

    /// Whether the whole record was read.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
