//! The run's report: `report.md` and `report.html` (tables and inline SVG loss curves).
//!
//! Every number comes from the run's state, which holds what the services reported, and sits
//! next to the registry version it belongs to. The HTML needs no scripts or network: plots are
//! SVG drawn here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::spec::{Pipeline, StageKind};
use super::state::{RunState, StageRecord, StageStatus};

/// One answer from a deployment, measured through the gateway.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ServingSample {
    pub deployment: String,
    /// The version the gateway said served the request (`x-ferrite-model-version`).
    pub version_id: String,
    pub model_label: String,
    pub prompt: String,
    pub answer: String,
    pub completion_tokens: Option<u64>,
    pub latency_ms: f64,
}

/// A table: header and rows of cells, rendered to Markdown or HTML.
#[derive(Debug, Default)]
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|cell| (*cell).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    fn markdown(&self) -> String {
        let line = |cells: &[String]| {
            let cells: Vec<String> = cells
                .iter()
                .map(|c| c.replace('|', "\\|").replace('\n', " "))
                .collect();
            format!("| {} |\n", cells.join(" | "))
        };
        let mut text = line(&self.header);
        text.push_str(&line(&vec!["---".to_owned(); self.header.len()]));
        for row in &self.rows {
            text.push_str(&line(row));
        }
        text
    }

    fn html(&self) -> String {
        let mut text = String::from("<table><thead><tr>");
        for cell in &self.header {
            let _ = write!(text, "<th>{}</th>", escape(cell));
        }
        text.push_str("</tr></thead><tbody>");
        for row in &self.rows {
            text.push_str("<tr>");
            for cell in row {
                let _ = write!(text, "<td>{}</td>", escape(cell));
            }
            text.push_str("</tr>");
        }
        text.push_str("</tbody></table>\n");
        text
    }
}

/// A section: a heading, an optional sentence, tables and plots.
#[derive(Debug, Default)]
struct Section {
    title: String,
    note: Option<String>,
    tables: Vec<Table>,
    /// (caption, SVG) pairs; the Markdown names the HTML for them.
    plots: Vec<(String, String)>,
}

/// Writes `report.md` and `report.html` into `folder`; returns the HTML's path.
pub fn write(
    pipeline: &Pipeline,
    state: &RunState,
    folder: &Path,
    samples: &[ServingSample],
) -> anyhow::Result<PathBuf> {
    let sections = sections(pipeline, state, samples);
    std::fs::create_dir_all(folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    let markdown = render_markdown(&pipeline.name, &sections);
    let html = render_html(&pipeline.name, &sections);
    let md_path = folder.join("report.md");
    let html_path = folder.join("report.html");
    std::fs::write(&md_path, markdown)
        .with_context(|| format!("cannot write {}", md_path.display()))?;
    std::fs::write(&html_path, html)
        .with_context(|| format!("cannot write {}", html_path.display()))?;
    Ok(html_path)
}

/// The summary table alone, as Markdown (printed at the end of the demo).
pub fn summary_markdown(pipeline: &Pipeline, state: &RunState) -> String {
    summary(pipeline, state).markdown()
}

fn sections(pipeline: &Pipeline, state: &RunState, samples: &[ServingSample]) -> Vec<Section> {
    let mut sections = vec![
        Section {
            title: "Summary".into(),
            note: Some("Held-out loss is the trainer's loss on data it did not train on (nats per token). The baseline is the unigram model of the training tokens for pretraining, and the base model's loss on the same held-out data for SFT, LoRA and QLoRA.".into()),
            tables: vec![summary(pipeline, state)],
            plots: Vec::new(),
        },
        Section {
            title: "Datasets".into(),
            note: None,
            tables: vec![datasets(state)],
            plots: Vec::new(),
        },
    ];
    let fine_tuned = fine_tuning(pipeline, state);
    if !fine_tuned.rows.is_empty() {
        sections.push(Section {
            title: "Full fine-tuning, LoRA and QLoRA side by side".into(),
            note: None,
            tables: vec![fine_tuned],
            plots: Vec::new(),
        });
    }
    sections.push(Section {
        title: "Loss curves".into(),
        note: None,
        tables: Vec::new(),
        plots: curves(pipeline, state),
    });
    if !samples.is_empty() {
        sections.push(Section {
            title: "Sample generations and serving latency".into(),
            note: Some("Each answer came through the gateway's /v1/chat/completions at temperature 0; latency is the whole request, measured by the client.".into()),
            tables: vec![serving(samples)],
            plots: Vec::new(),
        });
    }
    sections
}

fn summary(pipeline: &Pipeline, state: &RunState) -> Table {
    let mut table = Table::new(&[
        "stage",
        "kind",
        "status",
        "registry version",
        "version id",
        "held-out loss",
        "baseline",
        "seconds",
    ]);
    for stage in &pipeline.stages {
        let Some(record) = state.stages.get(&stage.name) else {
            table.rows.push(vec![
                stage.name.clone(),
                stage.kind.as_str().into(),
                "not run".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
            continue;
        };
        let (baseline_name, baseline) = baseline(record);
        table.rows.push(vec![
            stage.name.clone(),
            stage.kind.as_str().into(),
            status(record).into(),
            record.deployment.as_ref().map_or_else(
                || label(record),
                |name| format!("{} as `{name}`", label(record)),
            ),
            record.model_version_id.clone().unwrap_or_default(),
            number(record.metrics.get("eval_loss")),
            baseline.map_or_else(String::new, |value| format!("{value:.4} ({baseline_name})")),
            record
                .seconds
                .map_or_else(String::new, |s| format!("{s:.1}")),
        ]);
    }
    table
}

fn baseline(record: &StageRecord) -> (&'static str, Option<f64>) {
    match record.kind {
        StageKind::Pretrain => (
            "unigram",
            record.metrics.get("unigram_baseline_loss").copied(),
        ),
        StageKind::Sft | StageKind::Lora | StageKind::Qlora => {
            ("base model", record.metrics.get("base_eval_loss").copied())
        }
        _ => ("", None),
    }
}

fn status(record: &StageRecord) -> &'static str {
    match record.status {
        StageStatus::Running => "unfinished",
        StageStatus::Succeeded => "succeeded",
        StageStatus::Failed => "failed",
    }
}

fn label(record: &StageRecord) -> String {
    record.model_label.clone().unwrap_or_default()
}

fn number(value: Option<&f64>) -> String {
    value.map_or_else(String::new, |value| format!("{value:.4}"))
}

fn datasets(state: &RunState) -> Table {
    let mut table = Table::new(&["dataset", "version id", "kind", "rows", "bytes", "licence"]);
    for record in state.datasets.values() {
        table.rows.push(vec![
            record.label.clone(),
            record.version_id.clone(),
            record.kind.clone(),
            record
                .rows
                .map_or_else(String::new, |rows| rows.to_string()),
            record
                .bytes
                .map_or_else(String::new, |bytes| bytes.to_string()),
            record.licence.clone().unwrap_or_default(),
        ]);
    }
    table
}

fn fine_tuning(pipeline: &Pipeline, state: &RunState) -> Table {
    let mut table = Table::new(&[
        "stage",
        "kind",
        "registry version",
        "held-out loss",
        "base model loss",
        "gain",
        "mean tokens/s",
        "seconds",
    ]);
    let tuned = pipeline.stages.iter().filter(|stage| {
        matches!(
            stage.kind,
            StageKind::Sft | StageKind::Lora | StageKind::Qlora
        )
    });
    for stage in tuned {
        let Some(record) = state.stages.get(&stage.name) else {
            continue;
        };
        let eval = record.metrics.get("eval_loss");
        let base = record.metrics.get("base_eval_loss");
        let gain = eval
            .zip(base)
            .map(|(eval, base)| format!("{:.4}", base - eval));
        table.rows.push(vec![
            stage.name.clone(),
            stage.kind.as_str().into(),
            format!(
                "{} ({})",
                label(record),
                record.model_version_id.clone().unwrap_or_default()
            ),
            number(eval),
            number(base),
            gain.unwrap_or_default(),
            mean(record.series.get("tokens_per_second"))
                .map_or_else(String::new, |rate| format!("{rate:.0}")),
            record
                .seconds
                .map_or_else(String::new, |s| format!("{s:.1}")),
        ]);
    }
    table
}

fn mean(points: Option<&Vec<(u64, f64)>>) -> Option<f64> {
    let points = points.filter(|points| !points.is_empty())?;
    Some(points.iter().map(|(_, value)| value).sum::<f64>() / points.len() as f64)
}

fn serving(samples: &[ServingSample]) -> Table {
    let mut table = Table::new(&[
        "deployment",
        "serving version",
        "version id",
        "prompt",
        "answer",
        "tokens",
        "latency ms",
    ]);
    for sample in samples {
        table.rows.push(vec![
            sample.deployment.clone(),
            sample.model_label.clone(),
            sample.version_id.clone(),
            sample.prompt.clone(),
            sample.answer.clone(),
            sample
                .completion_tokens
                .map_or_else(String::new, |n| n.to_string()),
            format!("{:.0}", sample.latency_ms),
        ]);
    }
    table
}

fn curves(pipeline: &Pipeline, state: &RunState) -> Vec<(String, String)> {
    let mut plots = Vec::new();
    for stage in &pipeline.stages {
        let Some(record) = state.stages.get(&stage.name) else {
            continue;
        };
        let lines: BTreeMap<&str, &Vec<(u64, f64)>> = ["loss", "eval_loss"]
            .into_iter()
            .filter_map(|name| Some((name, record.series.get(name)?)))
            .filter(|(_, points)| !points.is_empty())
            .collect();
        if lines.is_empty() {
            continue;
        }
        let caption = format!(
            "{} ({}): {} ({})",
            stage.name,
            stage.kind.as_str(),
            label(record),
            record.model_version_id.as_deref().unwrap_or_default()
        );
        plots.push((caption, svg(&lines)));
    }
    plots
}

/// A line plot of each curve against steps, with its axis ranges written on it.
fn svg(lines: &BTreeMap<&str, &Vec<(u64, f64)>>) -> String {
    const WIDTH: f64 = 560.0;
    const HEIGHT: f64 = 220.0;
    const MARGIN: f64 = 40.0;
    let points = lines.values().flat_map(|points| points.iter());
    let (mut min_step, mut max_step, mut low, mut high) =
        (u64::MAX, 0, f64::INFINITY, f64::NEG_INFINITY);
    for (step, value) in points.filter(|(_, value)| value.is_finite()) {
        min_step = min_step.min(*step);
        max_step = max_step.max(*step);
        low = low.min(*value);
        high = high.max(*value);
    }
    let step_span = (max_step.saturating_sub(min_step)).max(1) as f64;
    let value_span = if high > low { high - low } else { 1.0 };
    let x = |step: u64| {
        MARGIN + (step.saturating_sub(min_step)) as f64 / step_span * (WIDTH - 2.0 * MARGIN)
    };
    let y = |value: f64| HEIGHT - MARGIN + (low - value) / value_span * (HEIGHT - 2.0 * MARGIN);
    let mut text = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" font-size=\"11\">\
<rect width=\"100%\" height=\"100%\" fill=\"white\" stroke=\"#ccc\"/>\
<text x=\"4\" y=\"{:.0}\">{high:.3}</text><text x=\"4\" y=\"{:.0}\">{low:.3}</text>\
<text x=\"{MARGIN}\" y=\"{:.0}\">step {min_step}</text><text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">step {max_step}</text>",
        MARGIN,
        HEIGHT - MARGIN,
        HEIGHT - 8.0,
        WIDTH - MARGIN,
        HEIGHT - 8.0,
    );
    let colours = ["#1f77b4", "#d62728"];
    for ((name, points), colour) in lines.iter().zip(colours.iter().cycle()) {
        let path: Vec<String> = points
            .iter()
            .filter(|(_, value)| value.is_finite())
            .map(|(step, value)| format!("{:.1},{:.1}", x(*step), y(*value)))
            .collect();
        let _ = write!(
            text,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
            path.join(" ")
        );
        let legend_y =
            MARGIN - 20.0 + 14.0 * colours.iter().position(|c| c == colour).unwrap_or(0) as f64;
        let _ = write!(
            text,
            "<text x=\"{:.0}\" y=\"{legend_y:.0}\" fill=\"{colour}\" text-anchor=\"end\">{name}</text>",
            WIDTH - MARGIN
        );
    }
    text.push_str("</svg>");
    text
}

fn render_markdown(name: &str, sections: &[Section]) -> String {
    let mut text = format!("# Pipeline `{name}`: report\n\n");
    for section in sections {
        let _ = writeln!(text, "## {}\n", section.title);
        if let Some(note) = &section.note {
            let _ = writeln!(text, "{note}\n");
        }
        for table in &section.tables {
            let _ = writeln!(text, "{}", table.markdown());
        }
        for (caption, _) in &section.plots {
            let _ = writeln!(text, "- {caption} (plot in report.html)");
        }
        if !section.plots.is_empty() {
            text.push('\n');
        }
    }
    text
}

fn render_html(name: &str, sections: &[Section]) -> String {
    let mut text = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Pipeline {0}</title>\
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}\
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;max-width:420px}}\
th{{background:#f4f4f4}}figure{{display:inline-block;margin:0 1em 1em 0}}</style></head>\
<body><h1>Pipeline <code>{0}</code>: report</h1>\n",
        escape(name)
    );
    for section in sections {
        let _ = writeln!(text, "<h2>{}</h2>", escape(&section.title));
        if let Some(note) = &section.note {
            let _ = writeln!(text, "<p>{}</p>", escape(note));
        }
        for table in &section.tables {
            text.push_str(&table.html());
        }
        for (caption, svg) in &section.plots {
            let _ = writeln!(
                text,
                "<figure>{svg}<figcaption>{}</figcaption></figure>",
                escape(caption)
            );
        }
    }
    text.push_str("</body></html>\n");
    text
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_tables_escape_pipes_and_html_escapes_markup() {
        let mut table = Table::new(&["a", "b"]);
        table.rows.push(vec!["x|y".into(), "<b>".into()]);
        assert_eq!(
            table.markdown(),
            "| a | b |\n| --- | --- |\n| x\\|y | <b> |\n"
        );
        assert!(table.html().contains("<td>&lt;b&gt;</td>"));
    }

    #[test]
    fn the_plot_maps_the_lowest_value_to_the_bottom_and_the_highest_to_the_top() {
        let points = vec![(0, 4.0), (10, 2.0)];
        let lines = BTreeMap::from([("loss", &points)]);
        let plot = svg(&lines);
        // Width 560, height 220, margin 40: step 0 -> x 40, step 10 -> x 520; the highest value
        // (4.0) -> y 40, the lowest (2.0) -> y 180.
        assert!(plot.contains("points=\"40.0,40.0 520.0,180.0\""), "{plot}");
    }
}
