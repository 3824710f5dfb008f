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
