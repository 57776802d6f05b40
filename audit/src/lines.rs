//! Bounded line reading: never buffers more than [`MAX_LINE_LEN`] + 1 bytes.

use std::io::{BufRead, Read};

use crate::entry::MAX_LINE_LEN;

/// One raw line.
#[derive(Debug)]
pub(crate) enum RawLine {
    /// A complete line (newline stripped).
    Complete(Vec<u8>),
    /// The file ends without a newline: these bytes are a torn (partial) last line.
    Torn(Vec<u8>),
    /// The line is longer than [`MAX_LINE_LEN`]; reading stopped.
    TooLong,
}

/// Reads lines of at most [`MAX_LINE_LEN`] bytes from `R`.
pub(crate) struct Lines<R> {
    inner: R,
    done: bool,
}

impl<R: BufRead> Lines<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self { inner, done: false }
    }

    /// The next line, `Ok(None)` at the end of the input.
    pub(crate) fn next_line(&mut self) -> std::io::Result<Option<RawLine>> {
        if self.done {
            return Ok(None);
        }
        let mut buf = Vec::new();
        // Read at most MAX + 1 bytes: the line itself plus its newline.
        let limit = u64::try_from(MAX_LINE_LEN)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let n = (&mut self.inner).take(limit).read_until(b'\n', &mut buf)?;
        if n == 0 {
            self.done = true;
            return Ok(None);
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            return Ok(Some(RawLine::Complete(buf)));
        }
        self.done = true;
        if buf.len() > MAX_LINE_LEN {
            return Ok(Some(RawLine::TooLong));
        }
        Ok(Some(RawLine::Torn(buf)))
    }
}
