//! The matrix as an SVG plot: decode tok/s and TTFT against link latency, one line per engine
//! and ring size. Written by hand (a few polylines and labels) rather than with a plotting
//! crate: the figure is simple and the agent's build stays small.

use std::fmt::Write;

use super::matrix::Matrix;
use crate::config::EngineKind;

const PANEL_W: f64 = 460.0;
const PANEL_H: f64 = 320.0;
const MARGIN_L: f64 = 60.0;
const MARGIN_T: f64 = 50.0;
const MARGIN_B: f64 = 50.0;
const GAP: f64 = 40.0;
const LEGEND_H: f64 = 70.0;

fn colour(nodes: u32) -> &'static str {
    match nodes {
        2 => "#1f77b4",
        3 => "#ff7f0e",
        4 => "#2ca02c",
        5 => "#d62728",
        _ => "#7f7f7f",
    }
}

fn dash(engine: EngineKind) -> &'static str {
    match engine {
        EngineKind::LlamaRpc => "",
        EngineKind::Prima => " stroke-dasharray=\"6 4\"",
    }
}

/// A round axis maximum at or above `v`: 1, 2 or 5 times a power of ten.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|m| *m >= v)
        .unwrap_or(10.0 * p)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One panel at x offset `x0`: `value` of each cell against its latency.
fn panel(
    out: &mut String,
    m: &Matrix,
    x0: f64,
    title: &str,
    value: fn(&super::matrix::Cell) -> Option<f64>,
) {
    let max_lat = m
        .cells
        .iter()
        .map(|c| c.latency_ms)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let y_max = nice_max(m.cells.iter().filter_map(value).fold(0.0, f64::max));
    let (w, h) = (PANEL_W - MARGIN_L - 20.0, PANEL_H - MARGIN_T - MARGIN_B);
    let px = |lat: f64| x0 + MARGIN_L + lat / max_lat * w;
    let py = |v: f64| MARGIN_T + h - v / y_max * h;
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"28\" font-size=\"15\" text-anchor=\"middle\">{}</text>",
        x0 + MARGIN_L + w / 2.0,
        escape(title)
    );
    let _ = writeln!(
        out,
        "<rect x=\"{:.1}\" y=\"{MARGIN_T}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"none\" stroke=\"#444\"/>",
        x0 + MARGIN_L
    );
    for i in 0..=5 {
        let v = y_max * f64::from(i) / 5.0;
        let y = py(v);
        let _ = writeln!(
            out,
            "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            x0 + MARGIN_L,
            x0 + MARGIN_L + w,
            x0 + MARGIN_L - 6.0,
            y + 4.0,
            if y_max >= 10.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        );
    }
    let mut lats: Vec<u64> = m.cells.iter().map(|c| c.latency_ms).collect();
    lats.sort_unstable();
    lats.dedup();
    for l in &lats {
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{l}</text>",
            px(*l as f64),
            MARGIN_T + h + 16.0
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">added one-way latency per link (ms)</text>",
        x0 + MARGIN_L + w / 2.0,
        MARGIN_T + h + 36.0
    );
    let mut rings: Vec<(EngineKind, u32)> = m.cells.iter().map(|c| (c.engine, c.nodes)).collect();
    rings.dedup();
    for (e, n) in rings {
        let pts: Vec<(f64, f64)> = m
            .cells
            .iter()
            .filter(|c| c.engine == e && c.nodes == n)
            .filter_map(|c| value(c).map(|v| (px(c.latency_ms as f64), py(v))))
            .collect();
        let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            out,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{}/>",
            path.join(" "),
            colour(n),
            dash(e)
        );
        for (x, y) in pts {
            let _ = match e {
                EngineKind::LlamaRpc => writeln!(
                    out,
                    "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3.5\" fill=\"{}\"/>",
                    colour(n)
                ),
                EngineKind::Prima => writeln!(
                    out,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"7\" height=\"7\" fill=\"{}\"/>",
                    x - 3.5,
                    y - 3.5,
                    colour(n)
                ),
            };
        }
    }
}

pub fn plot(m: &Matrix) -> String {
    let width = 2.0 * PANEL_W + GAP;
    let height = PANEL_H + LEGEND_H;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    panel(&mut out, m, 0.0, "decode tok/s (p50)", |c| c.decode_tok_s);
    panel(
        &mut out,
        m,
        PANEL_W + GAP,
        "time to first token, ms (p50)",
        |c| c.ttft_s.map(|t| t * 1000.0),
    );
    let mut rings: Vec<(EngineKind, u32)> = m.cells.iter().map(|c| (c.engine, c.nodes)).collect();
    rings.dedup();
    for (i, (e, n)) in rings.iter().enumerate() {
        let x = MARGIN_L + (i % 6) as f64 * 150.0;
        let y = PANEL_H + 10.0 + (i / 6) as f64 * 22.0;
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{}\" stroke-width=\"2\"{}/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\">{} × {n}</text>",
            x + 28.0,
            colour(*n),
            dash(*e),
            x + 34.0,
            y + 4.0,
            e
        );
    }
    let skipped: Vec<String> = m
        .engines
        .iter()
        .filter(|e| !e.available)
        .map(|e| format!("{}: {}", e.engine, e.detail))
        .collect();
    let _ = writeln!(
        out,
        "<text x=\"{MARGIN_L}\" y=\"{:.1}\" font-size=\"11\" fill=\"#555\">{} — {}, {} cores{}</text>",
        height - 8.0,
        escape(&m.date),
        escape(&m.machine.cpu_model),
        m.machine.cores,
        escape(&if skipped.is_empty() {
            String::new()
        } else {
            format!("; {}", skipped.join("; "))
        })
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(61.0), 100.0);
        assert_eq!(nice_max(4.2), 5.0);
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(200.0), 200.0);
    }
}
