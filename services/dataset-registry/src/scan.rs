//! Splits an uploaded byte stream into records without holding more than one record.
//!
//! Bytes arrive in chunks of any size. The scanner cuts them into lines, bounded by the
//! configured line length and checked for UTF-8, and turns lines into records: a non-empty line
//! for `text` and `jsonl`, one element of the top-level array for `json`, each with the line it
//! starts on. Problems go to the sink with their line, and scanning carries on, so one upload
//! reports many problems at once.

use crate::domain::DataFormat;

/// One thing wrong with an upload, at a line and field when known.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Problem {
    pub line: Option<u64>,
    /// The element of a JSON array, counted from 1; absent for lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<u64>,
    pub field: Option<String>,
    pub message: String,
}

impl Problem {
    pub fn at(line: u64, message: impl Into<String>) -> Self {
        Self {
            line: Some(line),
            record: None,
            field: None,
            message: message.into(),
        }
    }
}

/// Where records and problems go.
pub trait RecordSink {
    /// A record's bytes (valid UTF-8) and the line it starts on, counted from 1.
    fn record(&mut self, line: u64, bytes: &[u8]);
    /// Element `index` (counted from 1) of a JSON array; a record like any other by default.
    fn element(&mut self, index: u64, line: u64, bytes: &[u8]) {
        let _ = index;
        self.record(line, bytes);
    }
    fn problem(&mut self, problem: Problem);
}

/// The streaming splitter; feed it with [`Scanner::push`], end with [`Scanner::finish`].
pub struct Scanner {
    /// `None` until the first non-blank line decides between `json` and `jsonl`.
    format: Option<DataFormat>,
    max_line_bytes: usize,
    line_number: u64,
    line: Vec<u8>,
    overlong: bool,
    array: ArrayScanner,
}

impl Scanner {
    /// `format: None` picks `json` when the first non-blank byte is `[`, else `jsonl`.
    pub fn new(format: Option<DataFormat>, max_line_bytes: usize) -> Self {
        Self {
            format,
            max_line_bytes,
            line_number: 1,
            line: Vec::new(),
            overlong: false,
            array: ArrayScanner::new(max_line_bytes),
        }
    }

    /// The format in use; `jsonl` when nothing decided it (an empty body).
    pub fn format(&self) -> DataFormat {
        self.format.unwrap_or(DataFormat::Jsonl)
    }

    pub fn push(&mut self, mut chunk: &[u8], sink: &mut impl RecordSink) {
        while let Some(end) = chunk.iter().position(|b| *b == b'\n') {
            if self.line.is_empty() && !self.overlong && end <= self.max_line_bytes {
                // The whole line is in this chunk: no copy.
                self.line_ended(&chunk[..end], sink);
            } else {
                self.extend(&chunk[..end], sink);
                let line = std::mem::take(&mut self.line);
                self.line_ended(&line, sink);
                self.line = line;
                self.line.clear();
            }
            chunk = &chunk[end + 1..];
        }
        self.extend(chunk, sink);
    }

    pub fn finish(&mut self, sink: &mut impl RecordSink) {
        if !self.line.is_empty() || self.overlong {
            let line = std::mem::take(&mut self.line);
            self.line_ended(&line, sink);
        }
        if self.format == Some(DataFormat::Json) {
            self.array.finish(self.line_number, sink);
        }
    }

    fn extend(&mut self, bytes: &[u8], sink: &mut impl RecordSink) {
        if self.overlong {
            return;
        }
        if self.line.len() + bytes.len() > self.max_line_bytes {
            sink.problem(Problem::at(
                self.line_number,
                format!(
                    "the line is longer than the limit of {} bytes",
                    self.max_line_bytes
                ),
            ));
            self.overlong = true;
            self.array.break_off();
            self.line.clear();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn line_ended(&mut self, line: &[u8], sink: &mut impl RecordSink) {
        let number = self.line_number;
        self.line_number += 1;
        if std::mem::take(&mut self.overlong) {
            return;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text = match std::str::from_utf8(line) {
            Ok(text) => text,
            Err(e) => {
                sink.problem(Problem::at(
                    number,
                    format!(
                        "the line is not valid UTF-8 (at byte {} of the line)",
                        e.valid_up_to() + 1
                    ),
                ));
                self.array.break_off();
                return;
            }
        };
        let blank = text.trim().is_empty();
        if self.format.is_none() && !blank {
            let json = text.trim_start().starts_with('[');
            self.format = Some(if json {
                DataFormat::Json
            } else {
                DataFormat::Jsonl
            });
        }
        match self.format {
            Some(DataFormat::Json) => self.array.feed(number, line, sink),
            Some(_) if !blank => sink.record(number, line),
            _ => {}
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrayState {
    /// Before the opening `[`.
    Start,
    /// After `[` (first) or `,`: a value must come.
    BeforeElement {
        first: bool,
    },
    InElement,
    /// After a value: `,` or `]` must come.
    AfterElement,
    /// After the closing `]`: only whitespace may follow.
    End,
    /// A problem was reported; the rest of the array cannot be followed.
    Broken,
}

/// Follows one top-level JSON array byte by byte and hands out its elements.
struct ArrayScanner {
    state: ArrayState,
    depth: u32,
    in_string: bool,
    escaped: bool,
    element: Vec<u8>,
    start_line: u64,
    /// Elements completed so far.
    elements: u64,
    max_element_bytes: usize,
}

impl ArrayScanner {
    fn new(max_element_bytes: usize) -> Self {
        Self {
            state: ArrayState::Start,
            depth: 0,
            in_string: false,
            escaped: false,
            element: Vec::new(),
            start_line: 0,
            elements: 0,
            max_element_bytes,
        }
    }

    fn break_off(&mut self) {
        self.state = ArrayState::Broken;
        self.element = Vec::new();
    }

    fn feed(&mut self, line: u64, bytes: &[u8], sink: &mut impl RecordSink) {
        for &byte in bytes.iter().chain(std::iter::once(&b'\n')) {
            self.byte(line, byte, sink);
            if self.state == ArrayState::Broken {
                return;
            }
        }
    }

    fn byte(&mut self, line: u64, byte: u8, sink: &mut impl RecordSink) {
        let space = byte.is_ascii_whitespace();
        match self.state {
            ArrayState::Broken => {}
            _ if space && self.state != ArrayState::InElement => {}
            ArrayState::Start if byte == b'[' => {
                self.state = ArrayState::BeforeElement { first: true };
            }
            ArrayState::Start => self.fail(sink, line, "a json dataset is one array: expected `[`"),
            ArrayState::BeforeElement { first: true } if byte == b']' => {
                self.state = ArrayState::End;
            }
            ArrayState::BeforeElement { .. } if matches!(byte, b']' | b',') => {
                self.fail(sink, line, "expected a record after `,`");
            }
            ArrayState::BeforeElement { .. } => {
                self.state = ArrayState::InElement;
                self.start_line = line;
                self.element.clear();
                self.element_byte(line, byte, sink);
            }
            ArrayState::InElement => self.element_byte(line, byte, sink),
            ArrayState::AfterElement => match byte {
                b',' => self.state = ArrayState::BeforeElement { first: false },
                b']' => self.state = ArrayState::End,
                _ => self.fail(sink, line, "expected `,` or `]` after a record"),
            },
            ArrayState::End => self.fail(sink, line, "unexpected content after the closing `]`"),
        }
    }

    fn element_byte(&mut self, line: u64, byte: u8, sink: &mut impl RecordSink) {
        if self.in_string {
            self.element.push(byte);
            if self.escaped {
                self.escaped = false;
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    self.complete(sink);
                }
            }
        } else if self.depth == 0 && (byte.is_ascii_whitespace() || matches!(byte, b',' | b']')) {
            // The end of a bare scalar; the byte belongs to what follows it.
            self.complete(sink);
            self.byte(line, byte, sink);
            return;
        } else {
            self.element.push(byte);
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        self.complete(sink);
                    }
                }
                _ => {}
            }
        }
        if self.state == ArrayState::InElement && self.element.len() > self.max_element_bytes {
            let limit = self.max_element_bytes;
            self.fail(
                sink,
                self.start_line,
                format!(
                    "the record starting on this line is longer than the limit of {limit} bytes"
                ),
            );
        }
    }

    fn complete(&mut self, sink: &mut impl RecordSink) {
        self.elements += 1;
        sink.element(self.elements, self.start_line, &self.element);
        self.element.clear();
        self.depth = 0;
        self.state = ArrayState::AfterElement;
    }

    fn finish(&mut self, line: u64, sink: &mut impl RecordSink) {
        match self.state {
            ArrayState::End | ArrayState::Broken => {}
            ArrayState::Start => self.fail(sink, line, "the body holds no JSON array"),
            _ => self.fail(sink, line, "the JSON array is not closed with `]`"),
        }
    }

    fn fail(&mut self, sink: &mut impl RecordSink, line: u64, message: impl Into<String>) {
        sink.problem(Problem::at(line, message));
        self.break_off();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collected {
        records: Vec<(u64, String)>,
        problems: Vec<Problem>,
    }

    impl RecordSink for Collected {
        fn record(&mut self, line: u64, bytes: &[u8]) {
            self.records
                .push((line, String::from_utf8_lossy(bytes).into_owned()));
        }
        fn problem(&mut self, problem: Problem) {
            self.problems.push(problem);
        }
    }

    /// Scans `body` fed in chunks of `chunk` bytes, so records straddle chunk borders.
    fn scan(format: Option<DataFormat>, body: &[u8], chunk: usize, max: usize) -> Collected {
        let mut scanner = Scanner::new(format, max);
        let mut sink = Collected::default();
        for piece in body.chunks(chunk) {
            scanner.push(piece, &mut sink);
        }
        scanner.finish(&mut sink);
        sink
    }

    #[test]
    fn jsonl_records_carry_their_line_whatever_the_chunking() {
        let body = b"{\"a\":1}\r\n\n{\"b\":2}\n{\"c\":3}";
        for chunk in [1, 3, 64] {
            let got = scan(Some(DataFormat::Jsonl), body, chunk, 64);
            assert_eq!(
                got.records,
                [
                    (1, "{\"a\":1}".to_owned()),
                    (3, "{\"b\":2}".to_owned()),
                    (4, "{\"c\":3}".to_owned())
                ],
                "chunk {chunk}"
            );
            assert!(got.problems.is_empty());
        }
    }

    #[test]
    fn array_elements_come_out_one_by_one_with_their_start_line() {
        let body = b"[\n  {\"a\": \"x,]}\\\"\"},\n  {\"b\": [1, {\"c\": 2}]}\n]\n";
        for chunk in [1, 5, 100] {
            let got = scan(None, body, chunk, 64);
            assert_eq!(
                got.records,
                [
                    (2, "{\"a\": \"x,]}\\\"\"}".to_owned()),
                    (3, "{\"b\": [1, {\"c\": 2}]}".to_owned())
                ],
                "chunk {chunk}"
            );
            assert!(got.problems.is_empty(), "{:?}", got.problems);
        }
    }

    #[test]
    fn bare_scalars_in_an_array_are_records_too() {
        let got = scan(Some(DataFormat::Json), b"[1, \"s\" ,true]", 4, 64);
        let records: Vec<&str> = got.records.iter().map(|(_, r)| r.as_str()).collect();
        assert_eq!(records, ["1", "\"s\"", "true"]);
    }

    #[test]
    fn broken_arrays_are_reported() {
        for (body, line) in [
            (&b"{\"a\":1}"[..], 1),
            (b"[{\"a\":1},]", 1),
            (b"[{\"a\":1}\n", 2),
            (b"[{\"a\":1}] x", 1),
            (b"[{\"a\":1} {\"b\":2}]", 1),
        ] {
            let got = scan(Some(DataFormat::Json), body, 3, 64);
            assert_eq!(got.problems.len(), 1, "{:?}", String::from_utf8_lossy(body));
            assert_eq!(got.problems[0].line, Some(line));
        }
    }

    #[test]
    fn an_overlong_line_is_reported_and_the_next_line_still_read() {
        let body = b"short\nthis line is too long\nok\n";
        let got = scan(Some(DataFormat::Text), body, 4, 10);
        assert_eq!(got.problems.len(), 1);
        assert_eq!(got.problems[0].line, Some(2));
        assert!(got.problems[0].message.contains("limit of 10 bytes"));
        let lines: Vec<u64> = got.records.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [1, 3]);
    }

    #[test]
    fn invalid_utf8_names_its_line() {
        let got = scan(Some(DataFormat::Text), b"fine\nbad \xff byte\n", 64, 64);
        assert_eq!(got.problems.len(), 1);
        assert_eq!(got.problems[0].line, Some(2));
        assert!(got.problems[0].message.contains("UTF-8"));
    }
}
