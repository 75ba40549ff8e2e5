//! The bench's figures: per stream, per run, and their percentiles, with the table people read.
//! Pure: everything here is computed from samples already taken.

use serde::Serialize;

use super::client::Sample;

/// A distribution of one figure over the streams (or runs) of a bench.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dist {
    pub p50: f64,
    pub p95: f64,
    pub mean: f64,
    pub n: usize,
}

/// Nearest-rank percentiles: every reported value is one that was measured.
pub fn dist(values: &[f64]) -> Option<Dist> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[i.clamp(1, v.len()) - 1]
    };
    Some(Dist {
        p50: rank(50.0),
        p95: rank(95.0),
        mean: v.iter().sum::<f64>() / v.len() as f64,
        n: v.len(),
    })
}

/// One stream of one run: its figures, or why it has none.
#[derive(Debug, Clone, Serialize)]
pub struct StreamResult {
    pub run: u32,
    pub stream: u32,
    #[serde(flatten)]
    pub sample: Option<Sample>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One run: `parallel` streams started together.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub run: u32,
    pub wall_s: f64,
    /// Completion tokens of every stream of the run / the run's wall time.
    pub aggregate_tok_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub ttft_s: Option<Dist>,
    pub prefill_tok_s: Option<Dist>,
    pub decode_tok_s: Option<Dist>,
    pub aggregate_tok_s: Option<Dist>,
    pub streams: usize,
    pub failed: usize,
}

pub fn summarize(streams: &[StreamResult], runs: &[RunResult]) -> Summary {
    let ok: Vec<&Sample> = streams.iter().filter_map(|s| s.sample.as_ref()).collect();
    let pick =
        |f: fn(&Sample) -> Option<f64>| dist(&ok.iter().filter_map(|s| f(s)).collect::<Vec<_>>());
    Summary {
        ttft_s: pick(|s| Some(s.ttft_s)),
        prefill_tok_s: pick(|s| s.prefill_tok_s),
        decode_tok_s: pick(|s| s.decode_tok_s),
        aggregate_tok_s: dist(&runs.iter().map(|r| r.aggregate_tok_s).collect::<Vec<_>>()),
        streams: streams.len(),
        failed: streams.iter().filter(|s| s.sample.is_none()).count(),
    }
}

/// The run's aggregate from its streams.
pub fn run_result(run: u32, wall_s: f64, streams: &[StreamResult]) -> RunResult {
    let tokens: u64 = streams
        .iter()
        .filter_map(|s| s.sample.as_ref())
        .map(|s| s.completion_tokens)
        .sum();
    RunResult {
        run,
        wall_s,
        aggregate_tok_s: if wall_s > 0.0 {
            tokens as f64 / wall_s
        } else {
            0.0
        },
    }
}

fn cell(v: Option<f64>, scale: f64, width: usize) -> String {
    match v {
        Some(x) => format!("{:>width$.1}", x * scale),
        None => format!("{:>width$}", "-"),
    }
}

/// The summary rows of the people's table.
pub fn summary_table(s: &Summary) -> String {
    let mut out = format!("{:<20}{:>10}{:>10}{:>10}\n", "", "p50", "p95", "mean");
    for (name, d, scale) in [
        ("TTFT (ms)", &s.ttft_s, 1000.0),
        ("prefill (tok/s)", &s.prefill_tok_s, 1.0),
        ("decode (tok/s)", &s.decode_tok_s, 1.0),
        ("aggregate (tok/s)", &s.aggregate_tok_s, 1.0),
    ] {
        out.push_str(&format!(
            "{name:<20}{}{}{}\n",
            cell(d.as_ref().map(|d| d.p50), scale, 10),
            cell(d.as_ref().map(|d| d.p95), scale, 10),
            cell(d.as_ref().map(|d| d.mean), scale, 10),
        ));
    }
    if s.failed > 0 {
        out.push_str(&format!("{} of {} streams failed\n", s.failed, s.streams));
    }
    out
}

/// One line per stream.
pub fn streams_table(streams: &[StreamResult]) -> String {
    let mut out = format!(
        "{:>4}{:>7}{:>10}{:>15}{:>14}{:>8}{:>8}  tokens from\n",
        "run", "stream", "TTFT ms", "prefill tok/s", "decode tok/s", "prompt", "output"
    );
    for s in streams {
        match (&s.sample, &s.error) {
            (Some(x), _) => out.push_str(&format!(
                "{:>4}{:>7}{}{}{}{:>8}{:>8}  {}\n",
                s.run,
                s.stream,
                cell(Some(x.ttft_s), 1000.0, 10),
                cell(x.prefill_tok_s, 1.0, 15),
                cell(x.decode_tok_s, 1.0, 14),
                x.prompt_tokens.map_or("-".into(), |p| p.to_string()),
                x.completion_tokens,
                x.tokens_from
            )),
            (None, e) => out.push_str(&format!(
                "{:>4}{:>7}  failed: {}\n",
                s.run,
                s.stream,
                e.as_deref().unwrap_or("no sample")
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_values() {
        let d = dist(&[5.0, 1.0, 4.0, 2.0, 3.0]).expect("dist");
        assert_eq!((d.p50, d.p95, d.mean, d.n), (3.0, 5.0, 3.0, 5));
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        let d = dist(&twenty).expect("dist");
        assert_eq!((d.p50, d.p95), (10.0, 19.0));
        assert_eq!(dist(&[]), None);
        assert_eq!(dist(&[f64::NAN]), None);
        assert_eq!(dist(&[7.0]).map(|d| (d.p50, d.p95)), Some((7.0, 7.0)));
    }

    #[test]
    fn failed_streams_are_counted_and_left_out_of_the_figures() {
        let sample = Sample {
            ttft_s: 0.2,
            total_s: 1.2,
            prompt_tokens: Some(40),
            completion_tokens: 11,
            tokens_from: "usage",
            prefill_tok_s: Some(200.0),
            decode_tok_s: Some(10.0),
            engine_prefill_tok_s: None,
            engine_decode_tok_s: None,
        };
        let streams = vec![
            StreamResult {
                run: 0,
                stream: 0,
                sample: Some(sample),
                error: None,
            },
            StreamResult {
                run: 0,
                stream: 1,
                sample: None,
                error: Some("503".into()),
            },
        ];
        let run = run_result(0, 2.0, &streams);
        assert_eq!(run.aggregate_tok_s, 5.5);
        let s = summarize(&streams, &[run]);
        assert_eq!((s.streams, s.failed), (2, 1));
        assert_eq!(s.decode_tok_s.as_ref().map(|d| d.n), Some(1));
        let table = summary_table(&s);
        assert!(table.contains("1 of 2 streams failed"), "{table}");
        assert!(streams_table(&streams).contains("failed: 503"));
    }
}
