//! Node agent tests with real child processes (`/bin/sh` standing in for an engine binary via
//! `engine_dir`), exercising reconciliation and exit reporting.

use super::*;
use crate::config::Config;
use crate::runner::process::ProcessRunner;
use std::path::Path;

fn write_exec(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// A one-node llama-rpc "cluster" whose llama-server is a shell script.
fn setup(server_body: &str) -> (tempfile::TempDir, Arc<NodeAgent>) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_exec(&dir.path().join("llama-server"), server_body);
    let text = format!(
        "[cluster]\nname = \"t\"\nengine = \"llama-rpc\"\nstate_dir = \"{d}/state\"\n\
         [model]\npath = \"{d}/m.gguf\"\n\
         [[node]]\nrank = 0\naddress = \"127.0.0.1\"\nagent_port = 7700\nengine_dir = \"{d}\"\n",
        d = dir.path().display()
    );
    let config = Arc::new(Config::parse(&text, Path::new("t.toml")).expect("config"));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let agent =
        NodeAgent::new(config.clone(), 0, Arc::new(ProcessRunner::new(tx)), rx).expect("agent");
    (dir, agent)
}

fn spec(agent: &NodeAgent, generation: u64) -> RankSpec {
    let c = &agent.config;
    let mut p = crate::plan::plan(c, c.model(), generation, None).expect("plan");
    p.ranks.remove(0)
}

async fn wait_phase(agent: &NodeAgent, phase: RankPhase) -> RankStatus {
    let mut rx = agent.subscribe();
    let st = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.phase == phase))
        .await
        .expect("phase reached in time")
        .expect("agent alive")
        .clone();
    st
}

#[tokio::test]
async fn apply_is_idempotent_and_refuses_stale_generations() {
    let (_d, agent) = setup("exec sleep 300");
    let st = agent.apply(spec(&agent, 2)).await.expect("apply");
    assert_eq!(st.phase, RankPhase::Running);
    let pid = st.pid;
    let again = agent.apply(spec(&agent, 2)).await.expect("retry");
    assert_eq!(
        again.pid, pid,
        "a retried request must not restart the rank"
    );
    let err = agent.apply(spec(&agent, 1)).await.expect_err("stale");
    assert!(matches!(
        err,
        ApplyError::Stale {
            desired: 1,
            current: 2
        }
    ));
    // A spec the config does not plan is refused before any generation logic, naming the field.
    let mut changed = spec(&agent, 2);
    changed.ctx_size += 1;
    match agent.apply(changed).await {
        Err(ApplyError::Invalid(why)) => assert!(why.contains("ctx_size"), "{why}"),
        other => panic!("expected a refusal naming ctx_size, got {other:?}"),
    }
    let newer = agent.apply(spec(&agent, 3)).await.expect("newer");
    assert_ne!(newer.pid, pid, "a new generation replaces the process");
    assert_eq!(newer.generation, 3);
    let stopped = agent.stop().await;
    assert_eq!(stopped.phase, RankPhase::Idle);
}

#[tokio::test]
async fn a_crash_is_reported_with_its_output() {
    let (_d, agent) = setup("echo 'error: failed to connect to rpc server' >&2; exit 1");
    agent.apply(spec(&agent, 1)).await.expect("apply");
    let st = wait_phase(&agent, RankPhase::Exited).await;
    let exit = st.exit.expect("exit report");
    assert_eq!(exit.kind, ExitKind::Failed);
    assert_eq!(exit.code, Some(1));
    let err = st.last_error.expect("last error");
    assert!(err.contains("failed to connect to rpc server"), "{err}");
}

#[tokio::test]
async fn a_missing_binary_is_a_start_failure_not_a_panic() {
    let (d, agent) = setup("true");
    std::fs::remove_file(d.path().join("llama-server")).expect("rm");
    let st = agent.apply(spec(&agent, 1)).await.expect("apply answers");
    assert_eq!(st.phase, RankPhase::FailedToStart);
    assert!(st.last_error.expect("error").contains("llama-server"));
}

#[tokio::test]
async fn rejects_a_spec_for_another_rank() {
    let (_d, agent) = setup("true");
    let mut s = spec(&agent, 1);
    s.node = 1;
    assert!(matches!(agent.apply(s).await, Err(ApplyError::Invalid(_))));
}

#[test]
fn decide_table() {
    let base = RankStatus::idle(0, 1);
    let text = "[cluster]\nname=\"t\"\nengine=\"prima\"\n[model]\npath=\"/m\"\n[[node]]\nrank=0\naddress=\"127.0.0.1\"\n";
    let c = Config::parse(text, Path::new("t")).expect("config");
    let s5 = crate::plan::plan(&c, c.model(), 5, None)
        .expect("plan")
        .ranks
        .remove(0);
    assert_eq!(decide(&base, &s5), Decision::Replace);
    let cur = RankStatus {
        generation: 5,
        spec: Some(s5.clone()),
        ..base.clone()
    };
    assert_eq!(decide(&cur, &s5), Decision::Keep);
    let mut s4 = s5.clone();
    s4.generation = 4;
    assert_eq!(decide(&cur, &s4), Decision::Stale { current: 5 });
    let mut s6 = s5.clone();
    s6.generation = 6;
    assert_eq!(decide(&cur, &s6), Decision::Replace);
}

/// Mock runner for the control API tests: records the names it is asked to start and starts
/// nothing, so a test can tell whether a request reached the agent.
#[derive(Default)]
struct RecordingRunner {
    starts: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Runner for RecordingRunner {
    async fn start(
        &self,
        name: &str,
        _cmd: &crate::engine::CommandSpec,
    ) -> anyhow::Result<crate::runner::Started> {
        self.starts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_string());
        Ok(crate::runner::Started {
            pid: None,
            unit: None,
        })
    }

    async fn stop(&self, _name: &str) -> anyhow::Result<()> {
        Ok(())
    }

    fn stops_with_agent(&self) -> bool {
        true
    }
}

/// Every route of the control API refuses a request without the right bearer token with 401,
/// whatever the method, and nothing reaches the agent. The paths are the router's own list
/// ([`api::ROUTES`]), each with a child path, plus paths a later route might take and unknown
/// ones, so a route left outside the token check answers something else and fails this.
#[tokio::test]
async fn the_control_api_refuses_every_route_without_the_token() {
    use axum::body::Body;
    use axum::http::{header, Method, Request, StatusCode};
    use tower::ServiceExt;

    const TOKEN: &str = "control-token-0123456789abcdef";
    let (dir, process_agent) =
        setup("case \"$1\" in --version) echo 'version: 1 (test)';; *) exec sleep 300;; esac");
    let runner = Arc::new(RecordingRunner::default());
    let (_events, rx) = tokio::sync::mpsc::unbounded_channel();
    let agent = NodeAgent::new(process_agent.config.clone(), 0, runner.clone(), rx).expect("agent");
    let app = api::router(
        agent.clone(),
        crate::auth::Secret::new(TOKEN),
        tokio_util::sync::CancellationToken::new(),
    );
    let body = serde_json::to_vec(&spec(&agent, 1)).expect("spec json");

    let mut paths: Vec<String> = Vec::new();
    for (path, _) in api::ROUTES {
        paths.push(path.to_string());
        paths.push(format!("{path}/x"));
        paths.push(format!("{path}?after=0&wait_ms=0&token={TOKEN}"));
    }
    for p in [
        "/",
        "/v1",
        "/v1/",
        "/v1/rank/",
        "/v2/rank",
        "/v1/logs",
        "/v1/status",
        "/v1/stop",
        "/v1/start",
        "/v1/restart",
        "/v1/config",
        "/v1/version",
        "/v1/health",
        "/healthz",
        "/metrics",
        "/nonexistent",
    ] {
        paths.push(p.to_string());
    }
    let wrong_same_length = "x".repeat(TOKEN.len());
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("llm:{TOKEN}")
        )
    );
    let credentials: Vec<Option<String>> = vec![
        None,
        Some(format!("Bearer {wrong_same_length}")),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("bearer {wrong_same_length}")),
        Some("Bearer".into()),
        Some("Bearer ".into()),
        Some(basic),
        Some(format!("Basic {TOKEN}")),
        Some(format!("Token {TOKEN}")),
        Some(TOKEN.into()),
    ];
    let methods = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ];
    let mut tried = 0;
    for path in &paths {
        for method in &methods {
            for cred in &credentials {
                let mut req = Request::builder()
                    .method(method.clone())
                    .uri(path.as_str())
                    .header(header::CONTENT_TYPE, "application/json");
                if let Some(c) = cred {
                    req = req.header(header::AUTHORIZATION, c.as_str());
                }
                let req = req.body(Body::from(body.clone())).expect("request");
                let resp = app.clone().oneshot(req).await.expect("router answers");
                assert_eq!(
                    resp.status(),
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} with Authorization {cred:?}"
                );
                tried += 1;
            }
        }
    }
    // A header that is not UTF-8, and a wrong first header before the right one.
    for headers in [
        vec![axum::http::HeaderValue::from_bytes(b"Bearer \xff\xfe").expect("opaque bytes")],
        vec![
            axum::http::HeaderValue::from_static("Bearer wrong"),
            axum::http::HeaderValue::from_static(TOKEN),
        ],
    ] {
        let mut req = Request::builder().method(Method::PUT).uri("/v1/rank");
        for h in headers {
            req = req.header(header::AUTHORIZATION, h);
        }
        let req = req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.clone()))
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("router answers");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    assert!(tried > 1000, "{tried} requests");
    assert!(
        runner.starts.lock().expect("lock").is_empty(),
        "a refused request started a rank"
    );
    assert_eq!(agent.status().generation, 0);
    assert_eq!(agent.status().phase, RankPhase::Idle);

    // The same PUT with the token does start the rank: the check above could have failed.
    // The scheme is case-insensitive (RFC 7235), so `bearer` with the right token is accepted.
    for scheme in ["Bearer", "bearer"] {
        let req = Request::builder()
            .method(Method::PUT)
            .uri("/v1/rank")
            .header(header::AUTHORIZATION, format!("{scheme} {TOKEN}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.clone()))
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("router answers");
        assert_eq!(resp.status(), StatusCode::OK, "{scheme}");
    }
    assert_eq!(
        runner.starts.lock().expect("lock").len(),
        1,
        "started once (the second PUT is a retry)"
    );
    // Every listed route exists behind the token (not 404/405): the list is what is served.
    for (path, _) in api::ROUTES {
        let req = Request::builder()
            .method(Method::GET)
            .uri(*path)
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("router answers");
        if path.contains('{') {
            // A path parameter taken literally ("{name}") names nothing: the handler's 404.
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "GET {path}");
        } else {
            assert_eq!(resp.status(), StatusCode::OK, "GET {path}");
        }
    }
    drop(dir);
}

#[tokio::test]
async fn a_prima_container_abort_says_what_it_means() {
    let dir = tempfile::tempdir().expect("tempdir");
    // What prima's profiler prints on upstream main in a container, then SIGABRT.
    write_exec(
        &dir.path().join("prima-server"),
        "echo 'start profiling this device, this may take some seconds ...'\n\
         printf '%s\\n' 'src/llama.cpp:3637: GGML_ASSERT(dev_info->memory.total_physical > 0 && \"Failed to parse total physical memory\\n\") failed' >&2\n\
         kill -ABRT $$",
    );
    let text = format!(
        "[cluster]\nname = \"t\"\nengine = \"prima\"\nstate_dir = \"{d}/state\"\n\
         [model]\npath = \"{d}/m.gguf\"\n\
         [[node]]\nrank = 0\naddress = \"127.0.0.1\"\nagent_port = 7700\nengine_dir = \"{d}\"\n",
        d = dir.path().display()
    );
    let config = Arc::new(Config::parse(&text, Path::new("t.toml")).expect("config"));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let agent = NodeAgent::new(config, 0, Arc::new(ProcessRunner::new(tx)), rx).expect("agent");
    agent.apply(spec(&agent, 1)).await.expect("apply");
    let st = wait_phase(&agent, RankPhase::Exited).await;
    assert_eq!(st.exit.expect("exit report").kind, ExitKind::Failed);
    let err = st.last_error.expect("last error");
    assert!(
        err.contains("profiler could not read the memory limit inside a container")
            && err.contains("32e10881")
            && err.contains("layer_windows"),
        "{err}"
    );
    // The raw output stays, for whoever wants the detail.
    assert!(
        err.contains("Failed to parse total physical memory"),
        "{err}"
    );
}
