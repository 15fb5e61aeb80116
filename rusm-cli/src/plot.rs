//! `rusm plot`: turns `rusm bench --json` output into a self-contained SVG grouped bar chart of
//! messages/s, one group per backend (and per payload size and receiver count when the input
//! holds several), one bar per figure: ours with the default settings (a busy link coalesces),
//! ours with one stream per message (when a run with `--per-stream` is in the input), and the raw
//! baselines (one stream per message,
//! delivering into mailboxes, one buffered stream).
//!
//! The input is one or several files (`--input`, repeatable), each holding one JSON array as
//! `rusm bench --json` prints it, or several such arrays one after the other (`cat a.json
//! b.json`). Older output without the `raw_delivering` / `raw_one_stream` fields is accepted; the
//! bars it lacks are left out.
//!
//! The SVG is written by hand: a bar chart is a few dozen `<rect>` and `<text>` elements, not
//! worth a plotting crate in the dependency tree.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use serde::Deserialize;

/// Options of `rusm plot`.
#[derive(clap::Args, Debug)]
pub(crate) struct PlotArgs {
    /// A `rusm bench --json` output file: one JSON array, or several one after the other.
    /// Repeat for several files (e.g. a run without and one with `--per-stream`).
    #[arg(long, short, required = true)]
    input: Vec<PathBuf>,
    /// Where to write the SVG.
    #[arg(long, short)]
    output: PathBuf,
    /// The chart's title (default: what was measured, from the input).
    #[arg(long)]
    title: Option<String>,
}

/// The fields of one `rusm bench --json` row that the chart uses.
#[derive(Deserialize, Debug, Clone, PartialEq)]
struct BenchRow {
    backend: String,
    #[serde(default)]
    runtime: Option<String>,
    size: usize,
    receivers: usize,
    coalescing: bool,
    #[serde(default)]
    runs: Option<usize>,
    msgs_per_sec: f64,
    raw_msgs_per_sec: f64,
    #[serde(default)]
    raw_delivering_msgs_per_sec: Option<f64>,
    #[serde(default)]
    raw_one_stream_msgs_per_sec: Option<f64>,
}

/// Reads the inputs, draws the chart and writes it.
pub(crate) fn run(args: &PlotArgs) -> Result<()> {
    let mut rows = Vec::new();
    for path in &args.input {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        rows.extend(parse_rows(&text).with_context(|| format!("in {}", path.display()))?);
    }
    ensure!(!rows.is_empty(), "the input holds no benchmark rows");
    let chart = chart_of(&rows, args.title.clone());
    let svg = chart.to_svg();
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&args.output, svg)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!(
        "wrote {}: {} bars in {} group(s), from {} row(s)",
        args.output.display(),
        chart.bar_count(),
        chart.groups.len(),
        rows.len()
    );
    Ok(())
}

/// Every row of every JSON array in `text` (arrays may follow one another).
fn parse_rows(text: &str) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for array in serde_json::Deserializer::from_str(text).into_iter::<Vec<BenchRow>>() {
        rows.extend(array.context("not `rusm bench --json` output")?);
    }
    Ok(rows)
}

/// A grouped bar chart: `series[s].values[g]` is the bar of series `s` in group `g` (none when
/// that figure was not measured).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Chart {
    /// The title line.
    pub(crate) title: String,
    /// A smaller line under the title.
    pub(crate) subtitle: String,
    /// The label of the value axis.
    pub(crate) y_label: String,
    /// The label under the groups.
    pub(crate) x_label: String,
    /// The groups' labels, left to right.
    pub(crate) groups: Vec<String>,
    /// The series, in bar order within a group (and legend order).
    pub(crate) series: Vec<Series>,
}

/// One series of bars: a name for the legend, a fill colour, a value per group.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Series {
    /// The legend's text.
    pub(crate) name: String,
    /// The fill colour (an SVG colour).
    pub(crate) color: &'static str,
    /// One value per group; `None` draws no bar.
    pub(crate) values: Vec<Option<f64>>,
}

/// What a group of bars stands for: (backend, payload size, receivers).
type GroupKey<'a> = (&'a str, usize, usize);

/// The chart of `rows`: a group per (backend, size, receivers), in the order first seen.
fn chart_of(rows: &[BenchRow], title: Option<String>) -> Chart {
    let mut keys: Vec<GroupKey<'_>> = Vec::new();
    for r in rows {
        let key = (r.backend.as_str(), r.size, r.receivers);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    // The last row of a key with that coalescing setting wins.
    let find = |key: &GroupKey<'_>, coalescing: bool| {
        rows.iter().rev().find(|r| {
            (r.backend.as_str(), r.size, r.receivers) == *key && r.coalescing == coalescing
        })
    };
    // The baselines never coalesce: take them from the per-stream run, else from the other.
    let base = |key: &GroupKey<'_>| find(key, false).or_else(|| find(key, true));
    let series_of = |name: &str, color, value: &dyn Fn(&GroupKey<'_>) -> Option<f64>| Series {
        name: name.to_owned(),
        color,
        values: keys.iter().map(value).collect(),
    };
    let series: Vec<Series> = vec![
        series_of("ours, default (coalescing when busy)", "#2b6cb0", &|k| {
            find(k, true).map(|r| r.msgs_per_sec)
        }),
        series_of("ours, --per-stream", "#63b3ed", &|k| {
            find(k, false).map(|r| r.msgs_per_sec)
        }),
        series_of("raw, stream per message", "#dd6b20", &|k| {
            base(k).map(|r| r.raw_msgs_per_sec)
        }),
        series_of("raw, delivering to mailboxes", "#d69e2e", &|k| {
            base(k).and_then(|r| r.raw_delivering_msgs_per_sec)
        }),
        series_of("raw, one buffered stream", "#718096", &|k| {
            base(k).and_then(|r| r.raw_one_stream_msgs_per_sec)
        }),
    ]
    .into_iter()
    .filter(|s| s.values.iter().any(Option::is_some))
    .collect();

    let sizes = distinct(rows.iter().map(|r| r.size));
    let ks = distinct(rows.iter().map(|r| r.receivers));
    let one_case = sizes.len() == 1 && ks.len() == 1;
    let groups = keys
        .iter()
        .map(|(backend, size, k)| {
            if one_case {
                (*backend).to_owned()
            } else {
                format!("{backend} {size} B K={k}")
            }
        })
        .collect();
    let join = |v: &[usize]| {
        v.iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let title = title.unwrap_or_else(|| {
        format!(
            "Messages/s, two nodes on loopback: {} B payloads, K = {}",
            join(&sizes),
            join(&ks)
        )
    });
    let runtimes = distinct_str(rows.iter().filter_map(|r| r.runtime.as_deref()));
    let runs = distinct(rows.iter().filter_map(|r| r.runs));
    let subtitle = format!(
        "rusm bench --json; {} runtime; medians of {} run(s); higher is better",
        if runtimes.is_empty() {
            "unknown".to_owned()
        } else {
            runtimes.join(", ").replace('_', "-")
        },
        if runs.is_empty() {
            "?".to_owned()
        } else {
            join(&runs)
        }
    );
    Chart {
        title,
        subtitle,
        y_label: "messages / s (median)".to_owned(),
        x_label: if one_case {
            "backend".to_owned()
        } else {
            "backend, payload size, receivers".to_owned()
        },
        groups,
        series,
    }
}

/// The distinct values, sorted.
fn distinct(values: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut v: Vec<usize> = values.collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The distinct strings, in the order first seen.
fn distinct_str<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = Vec::new();
    for s in values {
        if !v.contains(&s) {
            v.push(s);
        }
    }
    v
}

// Layout, in SVG user units (pixels).
const BAR_W: f64 = 38.0;
const BAR_GAP: f64 = 4.0;
const GROUP_GAP: f64 = 48.0;
const LEFT: f64 = 84.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 78.0;
const PLOT_H: f64 = 320.0;
const MIN_WIDTH: f64 = 720.0;
const LEGEND_ROW: f64 = 20.0;

impl Chart {
    /// How many bars the chart draws (values present).
    pub(crate) fn bar_count(&self) -> usize {
        self.series
            .iter()
            .flat_map(|s| &s.values)
            .filter(|v| v.is_some())
            .count()
    }

    /// The chart as a standalone SVG document.
    pub(crate) fn to_svg(&self) -> String {
        let n_series = self.series.len().max(1) as f64;
        let n_groups = self.groups.len().max(1) as f64;
        let group_w = n_series * BAR_W + (n_series - 1.0) * BAR_GAP;
        // Wide enough for the bars and for the title (bold 17 px: about 9.5 px a character).
        let title_w = 9.5 * self.title.chars().count() as f64 + 40.0;
        let width = (LEFT + RIGHT + n_groups * (group_w + GROUP_GAP))
            .max(MIN_WIDTH)
            .max(title_w);
        let plot_w = width - LEFT - RIGHT;
        let slot = plot_w / n_groups;
        let axis_y = TOP + PLOT_H;
        // Legend: as many entries on a row as fit.
        let entry_w = |s: &Series| 22.0 + 6.6 * s.name.chars().count() as f64 + 18.0;
        let mut legend = Vec::new();
        let (mut x, mut row) = (LEFT, 0usize);
        for s in &self.series {
            if x + entry_w(s) > width - RIGHT && x > LEFT {
                x = LEFT;
                row += 1;
            }
            legend.push((x, row, s));
            x += entry_w(s);
        }
        let legend_top = axis_y + 62.0;
        let height = legend_top + (row as f64 + 1.0) * LEGEND_ROW + 12.0;

        let max = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten())
            .fold(0.0_f64, |a, &b| a.max(b));
        let (y_max, step) = nice_axis(max);
        let y_of = |v: f64| axis_y - v / y_max * PLOT_H;

        let mut svg = String::new();
        let w = &mut svg;
        // `write!` to a String cannot fail.
        let _ = writeln!(w, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        let _ = writeln!(
            w,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="Helvetica, Arial, sans-serif">"#
        );
        let _ = writeln!(
            w,
            r#"<rect class="background" x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#
        );
        let _ = writeln!(
            w,
            r#"<text x="{:.1}" y="28" font-size="17" font-weight="bold" text-anchor="middle">{}</text>"#,
            width / 2.0,
            escape(&self.title)
        );
        let _ = writeln!(
            w,
            r##"<text x="{:.1}" y="50" font-size="12" fill="#4a5568" text-anchor="middle">{}</text>"##,
            width / 2.0,
            escape(&self.subtitle)
        );
        // Grid lines and tick labels.
        let mut tick = 0.0;
        while tick <= y_max + step / 2.0 {
            let y = y_of(tick);
            let _ = writeln!(
                w,
                r##"<line x1="{LEFT:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e2e8f0"/>"##,
                width - RIGHT
            );
            let _ = writeln!(
                w,
                r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#4a5568" text-anchor="end">{}</text>"##,
                LEFT - 6.0,
                y + 4.0,
                fmt_tick(tick)
            );
            tick += step;
        }
        // Axes and their labels.
        let _ = writeln!(
            w,
            r##"<line x1="{LEFT:.1}" y1="{TOP:.1}" x2="{LEFT:.1}" y2="{axis_y:.1}" stroke="#2d3748"/>"##
        );
        let _ = writeln!(
            w,
            r##"<line x1="{LEFT:.1}" y1="{axis_y:.1}" x2="{:.1}" y2="{axis_y:.1}" stroke="#2d3748"/>"##,
            width - RIGHT
        );
        let _ = writeln!(
            w,
            r#"<text x="20" y="{:.1}" font-size="12" text-anchor="middle" transform="rotate(-90 20 {:.1})">{}</text>"#,
            TOP + PLOT_H / 2.0,
            TOP + PLOT_H / 2.0,
            escape(&self.y_label)
        );
        let _ = writeln!(
            w,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
            LEFT + plot_w / 2.0,
            axis_y + 42.0,
            escape(&self.x_label)
        );
        // Bars, their values, group labels.
        for (g, group) in self.groups.iter().enumerate() {
            let left = LEFT + g as f64 * slot + (slot - group_w) / 2.0;
            for (s, series) in self.series.iter().enumerate() {
                let Some(v) = series.values.get(g).copied().flatten() else {
                    continue;
                };
                let x = left + s as f64 * (BAR_W + BAR_GAP);
                let y = y_of(v);
                let _ = writeln!(
                    w,
                    r#"<rect class="bar" x="{x:.1}" y="{y:.1}" width="{BAR_W:.1}" height="{:.1}" fill="{}"><title>{}: {}: {:.0} msgs/s</title></rect>"#,
                    axis_y - y,
                    series.color,
                    escape(group),
                    escape(&series.name),
                    v
                );
                let _ = writeln!(
                    w,
                    r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                    x + BAR_W / 2.0,
                    y - 4.0,
                    fmt_value(v)
                );
            }
            let _ = writeln!(
                w,
                r#"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle">{}</text>"#,
                left + group_w / 2.0,
                axis_y + 20.0,
                escape(group)
            );
        }
        // Legend.
        for (x, row, s) in legend {
            let y = legend_top + row as f64 * LEGEND_ROW;
            let _ = writeln!(
                w,
                r#"<rect class="legend" x="{x:.1}" y="{:.1}" width="14" height="14" fill="{}"/>"#,
                y - 11.0,
                s.color
            );
            let _ = writeln!(
                w,
                r#"<text x="{:.1}" y="{y:.1}" font-size="12">{}</text>"#,
                x + 20.0,
                escape(&s.name)
            );
        }
        let _ = writeln!(w, "</svg>");
        svg
    }
}

/// The top of the value axis and the step between ticks: 1, 2 or 5 times a power of ten, about
/// five ticks, with room above the tallest bar for its label.
fn nice_axis(max: f64) -> (f64, f64) {
    if max <= 0.0 || !max.is_finite() {
        return (1.0, 0.2);
    }
    let rough = max / 5.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * magnitude);
    let mut top = (max / step).ceil() * step;
    if top - max < 0.06 * top {
        top += step;
    }
    (top, step)
}

/// `v` in millions or thousands when it is that large, with the unit's letter.
fn scale(v: f64) -> (f64, &'static str) {
    if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    }
}

/// A bar's value, three significant digits with a unit: `950`, `12.3k`, `394k`, `1.85M`.
fn fmt_value(v: f64) -> String {
    let (scaled, unit) = scale(v);
    let decimals = if scaled >= 100.0 {
        0
    } else if scaled >= 10.0 {
        1
    } else if unit.is_empty() {
        0
    } else {
        2
    };
    format!("{scaled:.decimals$}{unit}")
}

/// A tick label: `0`, `500k`, `1M`, `1.5M`.
fn fmt_tick(v: f64) -> String {
    let (scaled, unit) = scale(v);
    let s = format!("{scaled:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{unit}")
}

/// `s` with the characters XML gives a meaning escaped.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal XML check: one root, every tag closed in order, attributes quoted in pairs,
    /// no stray `<`, `>` or `&` in text. Returns the names of the elements, in document order.
    fn well_formed(xml: &str) -> Vec<String> {
        let mut rest = xml.trim();
        let mut open: Vec<String> = Vec::new();
        let mut elements = Vec::new();
        let mut roots = 0;
        while let Some(i) = rest.find('<') {
            check_text(&rest[..i]);
            rest = &rest[i + 1..];
            let end = rest.find('>').expect("an unterminated tag");
            let tag = &rest[..end];
            rest = &rest[end + 1..];
            assert!(!tag.contains('<'), "a `<` inside tag {tag:?}");
            assert_eq!(
                tag.matches('"').count() % 2,
                0,
                "unbalanced quotes: {tag:?}"
            );
            if tag.starts_with('?') {
                assert!(tag.ends_with('?') && elements.is_empty(), "{tag:?}");
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    open.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched </{name}>"
                );
                continue;
            }
            let name = tag
                .trim_end_matches('/')
                .split_whitespace()
                .next()
                .expect("an empty tag")
                .to_owned();
            if open.is_empty() {
                roots += 1;
            }
            elements.push(name.clone());
            if !tag.ends_with('/') {
                open.push(name);
            }
        }
        check_text(rest);
        assert!(open.is_empty(), "unclosed: {open:?}");
        assert_eq!(roots, 1, "one root element");
        elements
    }

    fn check_text(text: &str) {
        assert!(!text.contains('>'), "a stray `>` in {text:?}");
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..text[i..].find(';').map_or(text.len(), |j| i + j + 1)];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&entity),
                "a bare `&` in {text:?}"
            );
        }
    }

    fn sample() -> Chart {
        Chart {
            title: "Messages/s <64 B> & K=1".to_owned(),
            subtitle: "test".to_owned(),
            y_label: "messages / s".to_owned(),
            x_label: "backend".to_owned(),
            groups: vec!["quinn".to_owned(), "s2n".to_owned()],
            series: vec![
                Series {
                    name: "ours".to_owned(),
                    color: "#2b6cb0",
                    values: vec![Some(393_725.0), Some(192_185.0)],
                },
                Series {
                    name: "ours, coalescing".to_owned(),
                    color: "#63b3ed",
                    values: vec![Some(1_848_441.0), None],
                },
                Series {
                    name: "raw".to_owned(),
                    color: "#dd6b20",
                    values: vec![Some(908_558.0), Some(317_083.0)],
                },
            ],
        }
    }

    #[test]
    fn the_svg_is_well_formed_with_one_bar_per_value() {
        let chart = sample();
        let svg = chart.to_svg();
        let elements = well_formed(&svg);
        assert_eq!(elements[0], "svg");
        assert_eq!(chart.bar_count(), 5);
        assert_eq!(svg.matches(r#"<rect class="bar""#).count(), 5);
        assert_eq!(svg.matches(r#"<rect class="legend""#).count(), 3);
        // Values on the bars, the escaped title, the axis label.
        for text in [
            "394k",
            "1.85M",
            "192k",
            "&lt;64 B&gt; &amp; K=1",
            "messages / s",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        // Every bar stands on the axis and inside the plot.
        for rect in svg
            .lines()
            .filter(|l| l.starts_with(r#"<rect class="bar""#))
        {
            let attr = |name: &str| -> f64 {
                let start = rect.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
                rect[start..start + rect[start..].find('"').unwrap()]
                    .parse()
                    .unwrap()
            };
            assert!((attr("y") + attr("height") - (TOP + PLOT_H)).abs() < 0.2);
            assert!(attr("y") >= TOP);
        }
    }

    #[test]
    fn an_empty_chart_is_still_a_document() {
        let chart = Chart {
            groups: vec![],
            series: vec![],
            ..sample()
        };
        let svg = chart.to_svg();
        well_formed(&svg);
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 0);
    }

    const PER_STREAM_RUN: &str = r#"[
      {"backend": "quinn", "runtime": "multi_thread", "size": 64, "receivers": 1,
       "coalescing": false, "runs": 3, "msgs_per_sec": 400000.0, "raw_msgs_per_sec": 900000.0,
       "raw_delivering_msgs_per_sec": 700000.0, "raw_one_stream_msgs_per_sec": 5000000.0},
      {"backend": "s2n", "runtime": "multi_thread", "size": 64, "receivers": 1,
       "coalescing": false, "runs": 3, "msgs_per_sec": 200000.0, "raw_msgs_per_sec": 300000.0,
       "raw_delivering_msgs_per_sec": 250000.0, "raw_one_stream_msgs_per_sec": 3000000.0}
    ]"#;
    // An older run: no delivering / one-stream fields.
    const COALESCING_RUN: &str = r#"[
      {"backend": "quinn", "runtime": "multi_thread", "size": 64, "receivers": 1,
       "coalescing": true, "runs": 3, "msgs_per_sec": 1800000.0, "raw_msgs_per_sec": 880000.0}
    ]"#;

    #[test]
    fn concatenated_runs_make_one_group_per_backend() {
        let text = format!("{PER_STREAM_RUN}\n{COALESCING_RUN}\n");
        let rows = parse_rows(&text).unwrap();
        assert_eq!(rows.len(), 3);
        let chart = chart_of(&rows, None);
        assert_eq!(chart.groups, ["quinn", "s2n"]);
        let names: Vec<&str> = chart.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ours, default (coalescing when busy)",
                "ours, --per-stream",
                "raw, stream per message",
                "raw, delivering to mailboxes",
                "raw, one buffered stream"
            ]
        );
        assert_eq!(chart.series[0].values, [Some(1.8e6), None]);
        assert_eq!(chart.series[1].values[1], Some(2e5));
        // Baselines come from the per-stream run when there is one.
        assert_eq!(chart.series[2].values, [Some(9e5), Some(3e5)]);
        assert!(chart.title.contains("64 B") && chart.title.contains("K = 1"));
        assert!(chart.subtitle.contains("multi-thread"));
        assert_eq!(chart.bar_count(), 9);
        well_formed(&chart.to_svg());
    }

    #[test]
    fn an_older_run_alone_leaves_the_new_baselines_out() {
        let rows = parse_rows(COALESCING_RUN).unwrap();
        let chart = chart_of(&rows, Some("custom".to_owned()));
        assert_eq!(chart.title, "custom");
        assert_eq!(chart.series.len(), 2);
        assert!(parse_rows("{\"not\": \"an array\"}").is_err());
    }

    #[test]
    fn axis_and_labels_are_round() {
        assert_eq!(nice_axis(2_180_823.0), (2_500_000.0, 500_000.0));
        // Too close to a tick for the bar's label: one step more.
        assert_eq!(nice_axis(393_725.0), (500_000.0, 100_000.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
        assert_eq!(fmt_value(393_725.0), "394k");
        assert_eq!(fmt_value(1_848_441.0), "1.85M");
        assert_eq!(fmt_value(12_345.0), "12.3k");
        assert_eq!(fmt_value(950.0), "950");
        assert_eq!(fmt_tick(1_500_000.0), "1.5M");
        assert_eq!(fmt_tick(500_000.0), "500k");
        assert_eq!(fmt_tick(0.0), "0");
    }
}
