//! Checks each record against its kind's row schema and gathers row counts, lengths and a
//! capped report of problems.

use serde_json::Value;

use crate::domain::stats::{LengthHistogram, LengthStats};
use crate::domain::{DatasetKind, rows};
use crate::scan::{Problem, RecordSink};

/// Problems listed in a report; the rest are only counted.
pub const MAX_LISTED_PROBLEMS: usize = 100;

/// The problems of one upload: the first [`MAX_LISTED_PROBLEMS`] and how many in all.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Report {
    pub problems: Vec<Problem>,
    pub total: u64,
}

impl Report {
    pub fn add(&mut self, problem: Problem) {
        self.total += 1;
        if self.problems.len() < MAX_LISTED_PROBLEMS {
            self.problems.push(problem);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// A [`RecordSink`] that validates rows of one kind.
pub struct Validator {
    kind: DatasetKind,
    /// Characters of the valid rows, in bounded memory.
    lengths: LengthHistogram,
    report: Report,
}

impl Validator {
    pub fn new(kind: DatasetKind) -> Self {
        Self {
            kind,
            lengths: LengthHistogram::new(),
            report: Report::default(),
        }
    }

    pub fn rows(&self) -> u64 {
        self.lengths.rows()
    }

    /// Ends validation: the report when anything was wrong (an upload without rows is), else
    /// the length statistics.
    pub fn finish(mut self) -> Result<(u64, LengthStats), Report> {
        if self.report.is_empty() && self.lengths.rows() == 0 {
            self.report.add(Problem {
                line: None,
                record: None,
                field: None,
                message: "the upload holds no rows".into(),
            });
        }
        if !self.report.is_empty() {
            return Err(self.report);
        }
        let rows = self.rows();
        Ok((rows, self.lengths.stats()))
    }
}

impl Validator {
    /// Checks one row; `record` is its index in a JSON array.
    fn check(&mut self, line: u64, record: Option<u64>, bytes: &[u8]) {
        match row_chars(self.kind, bytes) {
            Ok(chars) => self.lengths.add(chars),
            Err(problems) => {
                for problem in problems {
                    self.report.add(Problem {
                        line: Some(line),
                        record,
                        ..problem
                    });
                }
            }
        }
    }
}

impl RecordSink for Validator {
    fn record(&mut self, line: u64, bytes: &[u8]) {
        self.check(line, None, bytes);
    }

    fn element(&mut self, index: u64, line: u64, bytes: &[u8]) {
        self.check(line, Some(index), bytes);
    }

    fn problem(&mut self, problem: Problem) {
        self.report.add(problem);
    }
}

/// The characters of a record's texts, without copying them, or its problems without a line.
fn row_chars(kind: DatasetKind, bytes: &[u8]) -> Result<u64, Vec<Problem>> {
    if kind == DatasetKind::Text {
        return Ok(String::from_utf8_lossy(bytes).chars().count() as u64);
    }
    let value = parse_row(bytes)?;
    let texts = check_row(kind, &value)?;
    Ok(texts.iter().map(|t| t.chars().count() as u64).sum())
}

/// The texts a record carries (a text row is its own text), or its problems without a line.
pub fn row_texts(kind: DatasetKind, bytes: &[u8]) -> Result<Vec<String>, Vec<Problem>> {
    if kind == DatasetKind::Text {
        return Ok(vec![String::from_utf8_lossy(bytes).into_owned()]);
    }
    let value = parse_row(bytes)?;
    let texts = check_row(kind, &value)?;
    Ok(texts.into_iter().map(str::to_owned).collect())
}

fn parse_row(bytes: &[u8]) -> Result<Value, Vec<Problem>> {
    serde_json::from_slice(bytes).map_err(|e| {
        vec![Problem {
            line: None,
            record: None,
            field: None,
            message: format!("not valid JSON: {e}"),
        }]
    })
}

fn check_row(kind: DatasetKind, value: &Value) -> Result<Vec<&str>, Vec<Problem>> {
    match rows::check(kind, value) {
        Ok(texts) => Ok(texts),
        Err(problems) => Err(problems
            .into_iter()
            .map(|p| Problem {
                line: None,
                record: None,
                field: (!p.field.is_empty()).then_some(p.field),
                message: p.message,
            })
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_lists_a_hundred_problems_and_counts_all() {
        let mut validator = Validator::new(DatasetKind::Sft);
        for line in 1..=250 {
            validator.record(line, b"{\"instruction\": 1}");
        }
        let report = validator.finish().expect_err("every row is bad");
        // Each row lacks `output` and has a non-string `instruction`: two problems per row.
        assert_eq!(report.total, 500);
        assert_eq!(report.problems.len(), MAX_LISTED_PROBLEMS);
        assert_eq!(report.problems[0].field.as_deref(), Some("instruction"));
        assert_eq!(report.problems[1].field.as_deref(), Some("output"));
    }

    #[test]
    fn lengths_count_characters_not_bytes() {
        let mut validator = Validator::new(DatasetKind::Sft);
        // "é" is 2 bytes and 1 character: 2 + 0 + 3 characters.
        validator.record(
            1,
            "{\"instruction\": \"éa\", \"output\": \"xyz\"}".as_bytes(),
        );
        let (rows, stats) = validator.finish().expect("valid");
        assert_eq!(rows, 1);
        assert_eq!(stats.total, 5);
    }

    #[test]
    fn array_elements_are_reported_by_record_and_line() {
        // A one-line array: all three records start on line 1, so only the record index
        // (1-based, in array order) tells the bad second one apart.
        let mut scanner = crate::scan::Scanner::new(None, 1024);
        let mut validator = Validator::new(DatasetKind::Sft);
        let body = br#"[{"instruction":"a","output":"b"},{"instruction":"a"},{"output":"c"}]"#;
        scanner.push(body, &mut validator);
        scanner.finish(&mut validator);
        let report = validator.finish().expect_err("two bad records");
        let places: Vec<_> = report
            .problems
            .iter()
            .map(|p| (p.record, p.line, p.field.as_deref()))
            .collect();
        assert_eq!(
            places,
            [
                (Some(2), Some(1), Some("output")),
                (Some(3), Some(1), Some("instruction"))
            ]
        );
    }

    #[test]
    fn an_empty_upload_is_refused() {
        let report = Validator::new(DatasetKind::Text)
            .finish()
            .expect_err("no rows");
        assert_eq!(report.total, 1);
    }
}
