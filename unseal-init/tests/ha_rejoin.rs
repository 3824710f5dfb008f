//! Vault HA: a member that lost its data volume rejoins its raft cluster instead of starting a
//! cluster of its own, on a real three-node OpenBao raft cluster.
//!
//! The members share one key store (one SoftHSM2 token here; in the HA overlay a Kubernetes
//! Secret that every pod decrypts with its own stick). Initialising the member that lost its
//! data would start a second, one-node cluster and replace the first one's keys in that shared
//! store, leaving every other member sealed for good.

mod common;

use common::*;
use nitrokey_e2e::openbao::{self, OpenBao};
use nitrokey_e2e::softhsm::{SoftHsm, USER_PIN};
use nitrokey_e2e::token::Token;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A config for one member: `vault_extra` goes into the `vault:` section, `extra` at the end.
fn member_config(
    dir: &Path,
    hsm: &SoftHsm,
    bao: &OpenBao,
    vault_extra: &str,
    extra: &str,
) -> PathBuf {
    let path = dir.join(format!("{}.yaml", bao.port()));
    std::fs::write(
        &path,
        format!(
            "mode: hsm\njournalDir: {}\nvault:\n  address: {}\n{vault_extra}hsm:\n  modulePath: {}\n  slotId: {}\n  pin: {USER_PIN}\n  keyLabel: bank-vaults\n{extra}",
            dir.join(format!("journal-{}", bao.port())).display(),
            bao.address(),
            hsm.module().display(),
            hsm.slot_id()
        ),
    )
    .expect("write config");
    path
}

fn run_once(hsm: &SoftHsm, config: &Path) -> Run {
    let mut cmd = command(hsm);
    cmd.arg("--config").arg(config).arg("--once");
    run(cmd, Duration::from_secs(120))
}

/// Every stored object's bytes, by label.
fn stored(hsm: &SoftHsm) -> Vec<(String, Vec<u8>)> {
    let mut labels = hsm.data_labels().expect("labels");
    labels.sort();
    labels
        .into_iter()
        .map(|l| {
            let bytes = hsm.read_data(&l).expect("read object");
            (l, bytes)
        })
        .collect()
}

/// Waits until one of `nodes` reports itself the active raft node (a new leader once the
/// old one is gone).
fn wait_for_leader(nodes: &[&OpenBao], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        for node in nodes {
            if let Ok((200, body)) = openbao::http(&node.address(), "GET", "/v1/sys/leader", None)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
                && v["is_self"] == true
            {
                return node.address();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no raft leader among the remaining members"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `node`'s raft configuration lists `count` voters: a joined node starts as a
/// non-voter, and autopilot promotes it once it has been healthy for a while. Only then can
/// the others elect a leader without the first one.
fn wait_for_voters(node: &OpenBao, root: &str, count: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, body) = node
            .get_with_token("/v1/sys/storage/raft/configuration", root)
            .expect("raft configuration");
        let voters = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v["data"]["config"]["servers"]
                    .as_array()
                    .map(|s| s.iter().filter(|s| s["voter"] == true).count())
            })
            .unwrap_or(0);
        if code == 200 && voters >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{voters} voters, not {count}: {body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_member_that_lost_its_data_rejoins_its_cluster_with_the_same_keys() {
    let hsm = SoftHsm::new().expect("token");
    let mut nodes = [
        OpenBao::start_raft("vault-0").expect("vault-0"),
        OpenBao::start_raft("vault-1").expect("vault-1"),
        OpenBao::start_raft("vault-2").expect("vault-2"),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let peers = format!(
        "  raftPeers:\n    - {}\n    - {}\n",
        nodes[1].address(),
        nodes[2].address()
    );
    let leader = format!("  raftLeaderAddress: {}\n", nodes[0].address());

    // A cold start: vault-0 initialises (its peers are up but uninitialised), the others join.
    let first = member_config(dir.path(), &hsm, &nodes[0], &peers, "");
    let r = run_once(&hsm, &first);
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert!(r.text.contains("initializing vault"), "{}", r.text);
    for node in &nodes[1..] {
        let cfg = member_config(dir.path(), &hsm, node, &leader, "");
        let r = run_once(&hsm, &cfg);
        assert_eq!(r.code, Some(0), "{}", r.text);
    }
    let before = stored(&hsm);
    assert!(
        before.iter().any(|(l, _)| l == "vault-unseal-0"),
        "{before:?}"
    );
    let root = decrypt_stored(&hsm, "vault-root");
    wait_for_voters(&nodes[0], &root, 3, Duration::from_secs(90));

    // vault-0's volume is lost; the other two carry on and elect a leader between them.
    nodes[0]
        .lose_data_and_restart()
        .expect("vault-0 without its data");
    assert!(!nodes[0].seal_status().expect("status").initialized);
    wait_for_leader(&[&nodes[1], &nodes[2]], Duration::from_secs(60));

    // Without raftPeers the member refuses and says how it would rejoin; nothing is written.
    let alone = member_config(dir.path(), &hsm, &nodes[0], "", "");
    let refused = run_once(&hsm, &alone);
    assert_ne!(refused.code, Some(0), "{}", refused.text);
    assert!(refused.text.contains("vault.raftPeers"), "{}", refused.text);
    assert_eq!(stored(&hsm), before, "a refusal writes nothing");

    // With its peers listed it rejoins, even with overwriteExistingKeys set: never an init.
    let rejoin = member_config(
        dir.path(),
        &hsm,
        &nodes[0],
        &peers,
        "options:\n  overwriteExistingKeys: true\n",
    );
    let r = run_once(&hsm, &rejoin);
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert!(r.text.contains("rejoining the cluster"), "{}", r.text);
    assert!(!r.text.contains("initializing vault"), "{}", r.text);
    let status = nodes[0]
        .wait_for(Duration::from_secs(30), |s| s.initialized && !s.sealed)
        .expect("vault-0 unsealed");
    assert!(status.initialized);
    assert_eq!(stored(&hsm), before, "the cluster's keys are untouched");

    // Still one cluster of three, and its keys still unseal the other members.
    let (code, body) = nodes[1]
        .get_with_token("/v1/sys/storage/raft/configuration", &root)
        .expect("raft configuration");
    assert_eq!(code, 200, "{body}");
    let config: serde_json::Value = serde_json::from_str(&body).expect("json");
    let mut ids: Vec<String> = config["data"]["config"]["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .filter_map(|s| s["node_id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    assert_eq!(ids, ["vault-0", "vault-1", "vault-2"], "{body}");
    nodes[2].restart().expect("vault-2 restarted sealed");
    let cfg2 = member_config(dir.path(), &hsm, &nodes[2], &leader, "");
    let r = run_once(&hsm, &cfg2);
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert!(!nodes[2].seal_status().expect("status").sealed);
}

/// The `retry_in_ms` of every "next pass" line with `pace`, in order.
fn delays(log: &str, pace: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("next pass") && l.contains(&format!("pace={pace}")))
        .filter_map(|l| {
            l.split("retry_in_ms=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// A follower's sidecar started with its cluster: its Vault not listening yet, then its
/// leader not yet initialised (OpenBao answers the join with `failed to get raft challenge`).
/// Both are retried from milliseconds, never after a whole `unsealPeriod` (a minute here), and
/// the expected join failure is said once, at INFO; the follower unseals once the leader is.
/// A `--once` run for a second follower waits for its leader the same way.
#[test]
fn a_follower_starting_with_its_cluster_retries_from_milliseconds_and_logs_no_error() {
    use common::faults::{Watched, poll};
    let hsm = SoftHsm::new().expect("token");
    let leader = OpenBao::start_raft("vault-0").expect("vault-0");
    let mut follower = OpenBao::start_raft("vault-1").expect("vault-1");
    let second = OpenBao::start_raft("vault-2").expect("vault-2");
    let dir = tempfile::tempdir().expect("tempdir");
    follower.stop().expect("vault-1 not listening yet");

    let port = openbao::free_port().expect("port");
    let config = member_config(
        dir.path(),
        &hsm,
        &follower,
        &format!("  raftLeaderAddress: {}\n", leader.address()),
        &format!("unsealPeriod: 60s\nmetricsAddress: 127.0.0.1:{port}\n"),
    );
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info,unseal_init::runner=debug");
    let w = Watched::spawn(cmd, None);
    let soon = |w: &Watched| delays(&w.log(), "Soon").len();
    assert!(
        poll(Duration::from_secs(60), || soon(&w) >= 3),
        "{}",
        w.tail(30)
    );
    assert!(w.logged(|l| l.contains("INFO") && l.contains("waiting for Vault's API")));

    // Vault comes up; its leader is not initialised yet, so the join fails, as expected.
    follower.start_again().expect("vault-1 listening");
    assert!(
        poll(Duration::from_secs(60), || {
            w.logged(|l| l.contains("could not join the raft cluster yet"))
        }),
        "{}",
        w.tail(30)
    );

    let once_config = member_config(
        dir.path(),
        &hsm,
        &second,
        &format!("  raftLeaderAddress: {}\n", leader.address()),
        "",
    );
    let mut once = command(&hsm);
    once.arg("--config").arg(&once_config).arg("--once");
    let mut once = Watched::spawn(once, None);
    assert!(
        poll(Duration::from_secs(60), || {
            once.logged(|l| l.contains("could not join the raft cluster yet"))
        }),
        "{}",
        once.tail(30)
    );

    // The leader is initialised and unsealed (by its own unseal-init); the followers join and
    // are unsealed by theirs.
    let first = member_config(dir.path(), &hsm, &leader, "", "");
    let r = run_once(&hsm, &first);
    assert_eq!(r.code, Some(0), "{}", r.text);
    follower
        .wait_for(Duration::from_secs(120), |s| s.initialized && !s.sealed)
        .unwrap_or_else(|e| panic!("{e}\n{}", w.tail(40)));
    assert!(
        poll(Duration::from_secs(10), || w.logged(|l| l
            .contains("next pass")
            && l.contains("pace=Period"))),
        "{}",
        w.tail(30)
    );

    let status = once.wait_exit(Duration::from_secs(120));
    let once_log = once.log();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{once_log}"
    );
    assert!(!second.seal_status().expect("status").sealed);
    assert!(!once_log.lines().any(|l| l.contains("ERROR")), "{once_log}");

    w.signal(libc::SIGTERM);
    let mut w = w;
    let status = w.wait_exit(Duration::from_secs(30));
    let log = w.log();
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{log}");
    // Every wait before the unseal was a doubling from milliseconds, each shorter than the
    // period; none was the period itself.
    let waits = delays(&log, "Soon");
    assert_eq!(waits[..3], [50, 100, 200], "{log}");
    assert!(waits.iter().all(|ms| *ms < 60_000), "{waits:?}");
    assert!(
        waits.windows(2).all(|p| p[1] == p[0] * 2 || p[1] == 60_000),
        "{waits:?}"
    );
    let period_waits = delays(&log, "Period");
    assert!(!period_waits.is_empty() && period_waits.iter().all(|ms| *ms == 60_000));
    let unsealed = log
        .lines()
        .position(|l| l.contains("successfully unsealed vault"))
        .expect("unsealed");
    assert!(
        !log.lines()
            .take(unsealed)
            .any(|l| l.contains("pace=Period")),
        "no whole-period wait before the unseal:\n{log}"
    );
    // The expected failure at INFO, once; nothing at ERROR.
    let join_info = log
        .lines()
        .filter(|l| l.contains("INFO") && l.contains("could not join the raft cluster yet"))
        .count();
    assert_eq!(join_info, 1, "{log}");
    assert!(log.contains("failed to get raft challenge"), "{log}");
    assert!(!log.lines().any(|l| l.contains("ERROR")), "{log}");
}
