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
    let mut p = crate::plan::plan(c, generation, None).expect("plan");
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
    let mut changed = spec(&agent, 2);
    changed.ctx_size += 1;
    assert!(matches!(
        agent.apply(changed).await,
        Err(ApplyError::Conflict(2))
    ));
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
    s.rank = 1;
    assert!(matches!(agent.apply(s).await, Err(ApplyError::Invalid(_))));
}

#[test]
fn decide_table() {
    let base = RankStatus {
        instance: 1,
        version: 0,
        rank: 0,
        generation: 0,
        phase: RankPhase::Idle,
        pid: None,
        unit: None,
        listening: false,
        command: None,
        exit: None,
        last_error: None,
        spec: None,
        facts_version: 0,
    };
    let text = "[cluster]\nname=\"t\"\nengine=\"prima\"\n[model]\npath=\"/m\"\n[[node]]\nrank=0\naddress=\"127.0.0.1\"\n";
    let c = Config::parse(text, Path::new("t")).expect("config");
    let s5 = crate::plan::plan(&c, 5, None)
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
