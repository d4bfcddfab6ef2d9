//! The dashboard's pictures, drawn on the server as inline SVG: metric charts (one series or several
//! overlaid), load bars, and the lineage graph laid out in columns by kind.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use crate::lineage::{Graph, Kind};

/// Colours for overlaid series, in order (distinguishable, and readable on white).
pub const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
];

/// Text safe inside HTML or SVG.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

/// A number short enough for an axis: 4 significant digits.
fn short(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return format!("{value}");
    }
    if value.fract() == 0.0 && value.abs() < 1e6 {
        return format!("{value:.0}");
    }
    let magnitude = value.abs().log10().floor() as i32;
    if !(-3..6).contains(&magnitude) {
        return format!("{value:.3e}");
    }
    let decimals = (3 - magnitude).max(0) as usize;
    format!("{value:.decimals$}")
}

/// One line of a chart: its name, colour, and (x, y) points (x is the step).
pub struct Series<'a> {
    pub name: &'a str,
    pub colour: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// A line chart of `series` over a shared x axis (steps), with the y range of all of them, min and max
/// ticks on both axes, and a legend when there is more than one series. Non-finite points are skipped.
pub fn line_chart(title: &str, series: &[Series<'_>]) -> String {
    let (width, height) = (640.0, 260.0);
    let (left, right, top, bottom) = (64.0, 16.0, 28.0, 36.0);
    let finite: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|line| line.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let mut svg = format!(
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" role=\"img\" aria-label=\"{}\">",
        escape(title)
    );
    let _ = write!(
        svg,
        "<text x=\"{left}\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        escape(title)
    );
    if finite.is_empty() {
        svg.push_str("<text x=\"64\" y=\"130\" font-size=\"13\" fill=\"#666\">no points</text></svg>");
        return svg;
    }
    let fold = |pick: fn(&(f64, f64)) -> f64| {
        finite
            .iter()
            .map(pick)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), value| {
                (low.min(value), high.max(value))
            })
    };
    let (mut x_low, mut x_high) = fold(|point| point.0);
    let (mut y_low, mut y_high) = fold(|point| point.1);
    if x_high == x_low {
        x_low -= 1.0;
        x_high += 1.0;
    }
    if y_high == y_low {
        y_low -= 0.5_f64.max(y_low.abs() * 0.05);
        y_high += 0.5_f64.max(y_high.abs() * 0.05);
    }
    let plot_width = width - left - right;
    let plot_height = height - top - bottom;
    let x_of = |x: f64| left + (x - x_low) / (x_high - x_low) * plot_width;
    let y_of = |y: f64| top + (1.0 - (y - y_low) / (y_high - y_low)) * plot_height;
    // Axes and their min/max ticks.
    let _ = write!(
        svg,
        "<g stroke=\"#999\" fill=\"none\"><path d=\"M{left} {top} V{} H{}\"/></g>",
        top + plot_height,
        left + plot_width
    );
    let _ = write!(
        svg,
        "<g font-size=\"11\" fill=\"#444\"><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><text x=\"{left}\" y=\"{}\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text></g>",
        left - 6.0,
        top + 4.0,
        short(y_high),
        left - 6.0,
        top + plot_height,
        short(y_low),
        height - 20.0,
        short(x_low),
        left + plot_width,
        height - 20.0,
        short(x_high),
        left + plot_width / 2.0,
        height - 6.0,
    );
    for line in series {
        let mut points: Vec<(f64, f64)> = line
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", x_of(*x), y_of(*y)))
            .collect();
        let _ = write!(
            svg,
            "<polyline class=\"series\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.8\" points=\"{}\"><title>{}</title></polyline>",
            line.colour,
            path.join(" "),
            escape(line.name)
        );
        if points.len() == 1 {
            let (x, y) = points[0];
            let _ = write!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>",
                x_of(x),
                y_of(y),
                line.colour
            );
        }
    }
    if series.len() > 1 {
        for (index, line) in series.iter().enumerate() {
            let y = top + 4.0 + 14.0 * index as f64;
            let _ = write!(
                svg,
                "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"3\" fill=\"{}\"/><text x=\"{}\" y=\"{}\" font-size=\"11\">{}</text>",
                left + plot_width - 170.0,
                y - 3.0,
                line.colour,
                left + plot_width - 155.0,
                y + 1.0,
                escape(line.name)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// A horizontal bar of `used` out of `total`, with the numbers beside it.
pub fn load_bar(used: f64, total: f64, unit: &str) -> String {
    let share = if total > 0.0 {
        (used / total).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let colour = if share > 0.9 {
        "#d62728"
    } else if share > 0.6 {
        "#ff7f0e"
    } else {
        "#2ca02c"
    };
    format!(
        "<svg class=\"bar\" xmlns=\"http://www.w3.org/2000/svg\" width=\"120\" height=\"12\" viewBox=\"0 0 120 12\"><rect width=\"120\" height=\"12\" fill=\"#eee\"/><rect width=\"{:.1}\" height=\"12\" fill=\"{colour}\"/></svg> {} / {} {unit}",
        120.0 * share,
        short(used),
        short(total)
    )
}

/// The lineage graph: one column per kind (feature views, datasets, runs, online tables, artifacts, logged
/// models, versions), nodes linked to their pages, edges drawn left to right with arrowheads; `root` outlined.
pub fn lineage(graph: &Graph, root: &str, link: impl Fn(&str) -> Option<String>) -> String {
    let order = [
        Kind::FeatureView,
        Kind::Dataset,
        Kind::Run,
        Kind::OnlineTable,
        Kind::Artifact,
        Kind::LoggedModel,
        Kind::ModelVersion,
    ];
    let columns: Vec<Vec<&crate::lineage::Node>> = order
        .iter()
        .map(|kind| {
            graph
                .nodes
                .values()
                .filter(|node| node.kind == *kind)
                .collect::<Vec<_>>()
        })
        .filter(|column| !column.is_empty())
        .collect();
    let (box_width, box_height, column_gap, row_gap) = (210.0, 46.0, 70.0, 18.0);
    let rows = columns.iter().map(Vec::len).max().unwrap_or(1) as f64;
    let width = 20.0 + columns.len() as f64 * (box_width + column_gap);
    let height = 20.0 + rows * (box_height + row_gap);
    let mut position: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for (index, column) in columns.iter().enumerate() {
        // Centre short columns against the tallest.
        let offset = (rows - column.len() as f64) * (box_height + row_gap) / 2.0;
        for (row, node) in column.iter().enumerate() {
            let x = 10.0 + index as f64 * (box_width + column_gap);
            let y = 10.0 + offset + row as f64 * (box_height + row_gap);
            position.insert(node.id.as_str(), (x, y));
        }
    }
    let mut svg = format!(
        "<svg class=\"lineage\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\"><defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#777\"/></marker></defs>"
    );
    for edge in &graph.edges {
        let (Some(from), Some(to)) = (position.get(edge.from.as_str()), position.get(edge.to.as_str())) else {
            continue;
        };
        let (x1, y1) = (from.0 + box_width, from.1 + box_height / 2.0);
        let (x2, y2) = (to.0, to.1 + box_height / 2.0);
        let bend = ((x2 - x1) / 2.0).abs().max(30.0);
        let _ = write!(
            svg,
            "<path class=\"edge\" d=\"M{x1:.1} {y1:.1} C{:.1} {y1:.1}, {:.1} {y2:.1}, {x2:.1} {y2:.1}\" fill=\"none\" stroke=\"#777\" stroke-width=\"1.4\" marker-end=\"url(#arrow)\"/>",
            x1 + bend,
            x2 - bend
        );
    }
    for node in graph.nodes.values() {
        let Some((x, y)) = position.get(node.id.as_str()) else {
            continue;
        };
        let fill = match node.kind {
            Kind::FeatureView => "#e8f4ea",
            Kind::Dataset => "#e6f0fa",
            Kind::Run => "#fff4e0",
            Kind::OnlineTable => "#e0f5f5",
            Kind::Artifact => "#f2f2f2",
            Kind::LoggedModel => "#f4e9f7",
            Kind::ModelVersion => "#fde8e8",
        };
        let stroke = if node.id == root {
            "stroke=\"#000\" stroke-width=\"2.5\""
        } else {
            "stroke=\"#999\""
        };
        let kind = format!("{:?}", node.kind);
        let mut label = node.label.clone();
        if label.chars().count() > 30 {
            label = label.chars().take(29).collect::<String>() + "…";
        }
        let shape = format!(
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{box_width}\" height=\"{box_height}\" rx=\"6\" fill=\"{fill}\" {stroke}/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#666\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\">{}</text><title>{}</title>",
            x + 8.0,
            y + 16.0,
            escape(&kind),
            x + 8.0,
            y + 34.0,
            escape(&label),
            escape(&node.label)
        );
        match link(&node.id) {
            Some(href) => {
                let _ = write!(svg, "<a class=\"node\" href=\"{}\">{shape}</a>", escape(&href));
            }
            None => {
                let _ = write!(svg, "<g class=\"node\">{shape}</g>");
            }
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_scales_its_series_into_the_plot_and_skips_what_it_cannot_draw() {
        let chart = line_chart(
            "loss <1>",
            &[
                Series {
                    name: "a",
                    colour: PALETTE[0],
                    points: vec![(1.0, 1.0), (3.0, 0.5), (2.0, f64::NAN)],
                },
                Series {
                    name: "b",
                    colour: PALETTE[1],
                    points: vec![(1.0, 0.0), (3.0, 0.25)],
                },
            ],
        );
        assert!(chart.contains("loss &lt;1&gt;"), "{chart}");
        // x 1..3 spans 64..624, y 0..1 spans 224..28: a's points at the corners of that range.
        assert!(chart.contains("points=\"64.0,28.0 624.0,126.0\""), "{chart}");
        assert!(chart.contains("points=\"64.0,224.0 624.0,175.0\""), "{chart}");
        assert!(chart.contains(">3</text>"), "whole steps without decimals: {chart}");
        assert_eq!(chart.matches("<polyline").count(), 2);
        assert!(chart.contains(">b</text>"), "a legend for overlaid series");
        let empty = line_chart("none", &[]);
        assert!(empty.contains("no points"));
    }

    #[test]
    fn numbers_and_text_are_made_safe_and_short() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(short(0.97222), "0.9722");
        assert_eq!(short(1234.4), "1234");
        assert_eq!(short(30.0), "30");
        assert_eq!(short(1.5e9), "1.500e9");
        assert!(load_bar(3.0, 4.0, "cpu").contains("width=\"90.0\""));
    }
}

/// Parallel coordinates: one vertical axis per column, each scaled to its own range (text columns spread
/// their distinct values evenly), one line per row across them, coloured from dark (best value of the last
/// column) to pale (worst); `lower_is_better` says which end is best. Missing values break a line.
pub fn parallel_coordinates(title: &str, columns: &[(String, Vec<ColumnValue>)], lower_is_better: bool) -> String {
    let rows = columns.first().map_or(0, |(_, values)| values.len());
    let (width, height) = ((120.0 * columns.len().max(2) as f64).max(480.0), 300.0);
    let (left, right, top, bottom) = (50.0, 50.0, 48.0, 30.0);
    let mut svg = format!(
        "<svg class=\"chart parallel\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" role=\"img\" aria-label=\"{}\">",
        escape(title)
    );
    let _ = write!(
        svg,
        "<text x=\"{left}\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        escape(title)
    );
    if rows == 0 || columns.is_empty() {
        svg.push_str("<text x=\"50\" y=\"150\" font-size=\"13\" fill=\"#666\">no trials</text></svg>");
        return svg;
    }
    let step = (width - left - right) / (columns.len().max(2) - 1) as f64;
    // Each column as positions in [0, 1] (0 at the bottom), with the labels of its ends.
    let scaled: Vec<(Vec<Option<f64>>, String, String)> = columns
        .iter()
        .map(|(_, values)| {
            let texts: BTreeSet<&str> = values
                .iter()
                .filter_map(|value| match value {
                    ColumnValue::Text(text) => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            let texts: Vec<&str> = texts.into_iter().collect();
            let numbers: Vec<f64> = values
                .iter()
                .filter_map(|value| match value {
                    ColumnValue::Number(number) if number.is_finite() => Some(*number),
                    _ => None,
                })
                .collect();
            let (low, high) = numbers
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), value| {
                    (low.min(*value), high.max(*value))
                });
            let position = |value: &ColumnValue| -> Option<f64> {
                match value {
                    ColumnValue::Number(number) if number.is_finite() => {
                        Some(if high > low { (number - low) / (high - low) } else { 0.5 })
                    }
                    ColumnValue::Text(text) => {
                        let index = texts.iter().position(|known| known == text)?;
                        Some(if texts.len() > 1 {
                            index as f64 / (texts.len() - 1) as f64
                        } else {
                            0.5
                        })
                    }
                    _ => None,
                }
            };
            let positions = values.iter().map(position).collect();
            if texts.is_empty() {
                (positions, short(low), short(high))
            } else {
                (positions, texts[0].to_string(), texts[texts.len() - 1].to_string())
            }
        })
        .collect();
    let y_of = |position: f64| top + (1.0 - position) * (height - top - bottom);
    // Colour by the last column's rank: best darkest.
    let last = &scaled[scaled.len() - 1].0;
    let mut order: Vec<usize> = (0..rows).filter(|row| last[*row].is_some()).collect();
    order.sort_by(|a, b| {
        let (a, b) = (last[*a].unwrap_or(0.0), last[*b].unwrap_or(0.0));
        if lower_is_better {
            a.total_cmp(&b)
        } else {
            b.total_cmp(&a)
        }
    });
    let shade = |row: usize| -> String {
        let rank = order.iter().position(|candidate| *candidate == row);
        let share = rank.map_or(1.0, |rank| rank as f64 / order.len().max(1) as f64);
        let light = (30.0 + 55.0 * share).round();
        format!("hsl(24, 80%, {light}%)")
    };
    // Worst first, so the best lines are drawn on top.
    let mut drawn: Vec<usize> = (0..rows).filter(|row| last[*row].is_none()).collect();
    drawn.extend(order.iter().rev());
    for row in drawn {
        let mut path = String::new();
        let mut pen_down = false;
        for (index, (positions, _, _)) in scaled.iter().enumerate() {
            match positions[row] {
                Some(position) => {
                    let _ = write!(
                        path,
                        "{}{:.1} {:.1} ",
                        if pen_down { "L" } else { "M" },
                        left + index as f64 * step,
                        y_of(position)
                    );
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        let _ = write!(
            svg,
            "<path class=\"trial\" d=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\" opacity=\"0.85\"/>",
            path.trim_end(),
            shade(row)
        );
    }
    for (index, ((name, _), (_, low, high))) in columns.iter().zip(&scaled).enumerate() {
        let x = left + index as f64 * step;
        let _ = write!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#444\"/><text x=\"{x:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\" font-weight=\"bold\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#555\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#555\">{}</text>",
            height - bottom,
            top - 20.0,
            escape(name),
            x + 4.0,
            top + 4.0,
            escape(high),
            x + 4.0,
            height - bottom,
            escape(low)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A value in a [`parallel_coordinates`] column.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnValue {
    Number(f64),
    Text(String),
    Missing,
}
