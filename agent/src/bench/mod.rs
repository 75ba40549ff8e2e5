//! `llm-agent bench`: time to first token, prefill and decode speed of any OpenAI-compatible
//! endpoint (the coordinator, or an engine's own port), over parallel streams and runs; and
//! with `--matrix`, local rings of both engines over node counts and link latencies made by
//! delaying relays, written under bench/results/ as JSON, text and an SVG plot.

mod client;
mod matrix;
mod relay;
mod stats;
mod svg;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::config::EngineKind;
use client::Target;
use stats::{RunResult, StreamResult, Summary};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// The OpenAI-compatible endpoint (with or without /v1): the coordinator's API, or an
    /// engine's own port.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Bearer key for the endpoint.
    #[arg(long, env = "LLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model name to ask for (default: the first /v1/models lists).
    #[arg(long)]
    pub model: Option<String>,
    /// Prompt length in tokens (about: the engine's own count is reported).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: u32,
    /// Tokens to generate per stream (llama.cpp engines are asked to ignore end-of-text).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(2..))]
    pub max_tokens: u32,
    /// Streams started together in each run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub parallel: u32,
    /// Measured runs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Unmeasured requests before the runs.
    #[arg(long, default_value_t = 1)]
    pub warmup: u32,
    /// Seconds one request may take before it counts as failed.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// Send only OpenAI's own request fields, for endpoints that refuse others (llama.cpp's
    /// `ignore_eos` and `cache_prompt` are left out, so a stream may end before --max-tokens).
    #[arg(long)]
    pub openai_only: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Start local rings (`up --local`) and bench each engine over --nodes and --latency-ms,
    /// with a delaying relay on every link between ranks; writes JSON, text and SVG to --out.
    #[arg(long)]
    pub matrix: bool,
    /// --matrix: engines to run; prima is left out, with the reason, when its binaries are
    /// not found.
    #[arg(long, value_delimiter = ',', default_value = "llama-rpc,prima")]
    pub engines: Vec<EngineKind>,
    /// --matrix: how many times each ring steps through the latencies (interleaved, so a
    /// change in the machine's load spreads over all of them); the figures are over all.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub sweeps: u32,
    /// --matrix: ring sizes.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
    pub nodes: Vec<u32>,
    /// --matrix: one-way delay added to each direction of every link between ranks, in ms.
    #[arg(long, value_delimiter = ',', default_value = "0,5,10,20")]
    pub latency_ms: Vec<u64>,
    /// --matrix: the GGUF for llama.cpp RPC rings.
    #[arg(long, env = "LLM_MODEL")]
    pub model_file: Option<PathBuf>,
    /// --matrix: the GGUF for prima rings (default: --model-file). The rings get even layer
    /// windows, so prima's profiler does not run.
    #[arg(long)]
    pub prima_model_file: Option<PathBuf>,
    /// --matrix: llama.cpp's binaries (llama-server, ggml-rpc-server); PATH when absent.
    #[arg(long, env = "LLAMA_CPP_DIR")]
    pub llama_dir: Option<PathBuf>,
    /// --matrix: prima.cpp's binaries (prima-server/prima-cli, or an upstream build's
    /// llama-server/llama-cli); PATH when absent.
    #[arg(long, env = "PRIMA_CPP_DIR")]
    pub prima_dir: Option<PathBuf>,
    /// --matrix: where the results go.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// --matrix: file name stem of the results (default: matrix-<UTC date>).
    #[arg(long)]
    pub name: Option<String>,
    /// --matrix: added to every port of the rings (as `up --port-offset`; each further ring
    /// adds one more).
    #[arg(long, default_value_t = 0)]
    pub port_offset: u16,
    /// --matrix: threads per rank.
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
}

/// One bench of one endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub model: String,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub parallel: u32,
    pub runs: Vec<RunResult>,
    pub streams: Vec<StreamResult>,
    pub summary: Summary,
}

pub async fn run(args: BenchArgs) -> Result<()> {
    if args.matrix {
        return matrix::run(&args).await;
    }
    let report = bench_endpoint(&args, &args.url, args.model.clone(), "").await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("cannot write the report as JSON")?
        );
    } else {
        print!("{}", people_text(&report));
    }
    if report.summary.failed == report.summary.streams {
        anyhow::bail!("every stream failed");
    }
    Ok(())
}

fn people_text(r: &Report) -> String {
    format!(
        "llm-agent bench: {} model {}, prompt ~{} tokens, {} tokens out, {} stream(s) x {} run(s)\n\n{}\n{}",
        r.url,
        r.model,
        r.prompt_tokens,
        r.max_tokens,
        r.parallel,
        r.runs.len(),
        stats::summary_table(&r.summary),
        stats::streams_table(&r.streams)
    )
}

/// A progress bar on stderr when it is a terminal (and the output is not JSON for a pipe),
/// hidden otherwise.
fn progress(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} streams {elapsed}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// Warm-up, then `runs` runs of `parallel` streams at `url`; `label` names it on the bar.
pub async fn bench_endpoint(
    args: &BenchArgs,
    url: &str,
    model: Option<String>,
    label: &str,
) -> Result<Report> {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")?;
    let mut target = Target {
        base: client::api_base(url),
        api_key: args.api_key.clone(),
        model: String::new(),
        prompt_tokens: args.prompt_tokens,
        max_tokens: args.max_tokens,
        timeout: Duration::from_secs(args.timeout),
        llama_fields: !args.openai_only,
    };
    target.model = match model {
        Some(m) => m,
        None => client::first_model(&http, &target).await?,
    };
    let label = if label.is_empty() {
        target.base.clone()
    } else {
        label.to_string()
    };
    // Tags only keep prompts apart; a fresh base per bench keeps them apart across benches too.
    let tag0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    for w in 0..args.warmup {
        client::measure(&http, &target, tag0 + u64::from(w))
            .await
            .with_context(|| format!("{label}: warm-up request"))?;
    }
    let bar = progress(u64::from(args.runs * args.parallel), &label);
    let mut streams = Vec::new();
    let mut runs = Vec::new();
    for run in 0..args.runs {
        let started = Instant::now();
        let futures = (0..args.parallel).map(|stream| {
            let (http, target, bar) = (&http, &target, &bar);
            let tag = tag0 + 1000 + u64::from(run * args.parallel + stream);
            async move {
                let r = client::measure(http, target, tag).await;
                bar.inc(1);
                match r {
                    Ok(sample) => StreamResult {
                        run,
                        stream,
                        sample: Some(sample),
                        error: None,
                    },
                    Err(e) => StreamResult {
                        run,
                        stream,
                        sample: None,
                        error: Some(format!("{e:#}")),
                    },
                }
            }
        });
        let these = futures_util::future::join_all(futures).await;
        runs.push(stats::run_result(
            run,
            started.elapsed().as_secs_f64(),
            &these,
        ));
        streams.extend(these);
    }
    bar.finish_and_clear();
    let summary = stats::summarize(&streams, &runs);
    Ok(Report {
        url: target.base,
        model: target.model,
        prompt_tokens: args.prompt_tokens,
        max_tokens: args.max_tokens,
        parallel: args.parallel,
        runs,
        streams,
        summary,
    })
}

/// Several benches of one endpoint as one: their runs and streams together (runs numbered on),
/// the summary over all of them.
pub fn merge_reports(reports: Vec<Report>) -> Option<Report> {
    let mut it = reports.into_iter();
    let mut all = it.next()?;
    for r in it {
        let base = all.runs.len() as u32;
        all.runs.extend(r.runs.into_iter().map(|mut x| {
            x.run += base;
            x
        }));
        all.streams.extend(r.streams.into_iter().map(|mut s| {
            s.run += base;
            s
        }));
    }
    all.summary = stats::summarize(&all.streams, &all.runs);
    Some(all)
}

#[cfg(test)]
impl BenchArgs {
    /// The arguments of `llm-agent bench EXTRA…`, parsed as the CLI would.
    pub fn try_parse_from_for_test(extra: &[&str]) -> BenchArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        Cli::try_parse_from(std::iter::once("bench").chain(extra.iter().copied()))
            .expect("bench arguments parse")
            .bench
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_reports_number_their_runs_on_and_summarize_all_streams() {
        let report = |ttft: f64| {
            let streams = vec![StreamResult {
                run: 0,
                stream: 0,
                sample: Some(client::Sample {
                    ttft_s: ttft,
                    total_s: 1.0,
                    prompt_tokens: Some(10),
                    completion_tokens: 5,
                    tokens_from: "usage",
                    prefill_tok_s: Some(10.0 / ttft),
                    decode_tok_s: Some(4.0),
                    engine_prefill_tok_s: None,
                    engine_decode_tok_s: None,
                }),
                error: None,
            }];
            let runs = vec![stats::run_result(0, 1.0, &streams)];
            Report {
                url: "u".into(),
                model: "m".into(),
                prompt_tokens: 10,
                max_tokens: 5,
                parallel: 1,
                summary: stats::summarize(&streams, &runs),
                runs,
                streams,
            }
        };
        let m = merge_reports(vec![report(0.1), report(0.3), report(0.2)]).expect("merged");
        let runs: Vec<u32> = m.streams.iter().map(|s| s.run).collect();
        assert_eq!(runs, [0, 1, 2]);
        assert_eq!(m.summary.ttft_s.map(|d| (d.n, d.p50)), Some((3, 0.2)));
        assert!(merge_reports(Vec::new()).is_none());
    }
}
