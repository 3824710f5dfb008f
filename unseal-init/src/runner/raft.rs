//! Raft membership: a member that is not initialised joins its leader (or the peer that
//! answers as initialised) instead of initialising, and the expected first refusals of a cold
//! start are retried from a short backoff and logged at INFO.

use super::*;

/// True for a failed raft join: expected while the leader is not yet able to take members
/// (OpenBao answers `HTTP 500: failed to get raft challenge` on every cold start).
pub(super) fn join_failure(err: &PassError) -> bool {
    matches!(
        err,
        PassError::JoinFailed(_)
            | PassError::Vault(VaultError::Status {
                endpoint: "sys/storage/raft/join",
                ..
            })
    )
}

impl Runner {
    /// Clients for `vault.raftPeers`, trusting the same CA as Vault's own. A peer whose client
    /// cannot be built (the CA file, already checked for Vault's own client) is left out with
    /// a warning rather than stopping the unseal of this Vault.
    pub(super) fn with_peer_addresses(mut self) -> Self {
        for address in &self.cfg.vault.raft_peers {
            match crate::vault::VaultClient::new(address, self.cfg.vault.ca_cert.as_deref()) {
                Ok(client) => self.peers.push(Arc::new(client)),
                Err(e) => tracing::warn!(peer = address.as_str(), error = %e, "raft peer left out"),
            }
        }
        self
    }

    /// Replaces the raft peers (tests use in-memory Vaults).
    pub fn with_peers(mut self, peers: Vec<Arc<dyn VaultApi>>) -> Self {
        self.peers = peers;
        self
    }

    /// The first raft peer that answers initialised. Peers that do not answer are skipped: on
    /// a cluster's first start the others are not up yet (a StatefulSet starts them after this
    /// one), and only a peer that answers initialised proves a cluster exists.
    pub(super) async fn initialized_peer(&self) -> Option<String> {
        for peer in &self.peers {
            match peer.seal_status().await {
                Ok(s) if s.initialized => return Some(peer.address().to_owned()),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(peer = peer.address(), reason = %e, "raft peer not answering")
                }
            }
        }
        None
    }

    pub(super) fn raft_follower(&self) -> bool {
        self.cfg
            .vault
            .raft_leader_address
            .as_deref()
            .is_some_and(|l| l.trim_end_matches('/') != self.vault.address())
    }

    pub(super) async fn join(&self) -> Result<(), PassError> {
        let leader = self
            .cfg
            .vault
            .raft_leader_address
            .clone()
            .unwrap_or_default();
        self.join_to(&leader).await
    }

    /// Joins this Vault to the raft cluster `leader` belongs to.
    pub(super) async fn join_to(&self, leader: &str) -> Result<(), PassError> {
        let leader = leader.to_owned();
        let ca = match &self.cfg.vault.ca_cert {
            Some(p) => std::fs::read_to_string(p).ok(),
            None => None,
        };
        tracing::info!(leader = leader.as_str(), "joining leader vault...");
        if !self.vault.raft_join(&leader, ca.as_deref()).await? {
            return Err(PassError::JoinFailed(leader));
        }
        // The follower reports itself initialised once the join took; give it a moment.
        for _ in 0..50 {
            if let Ok(s) = self.vault.seal_status().await
                && s.initialized
            {
                tracing::info!(leader = leader.as_str(), "joined raft leader");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(PassError::JoinFailed(leader))
    }

    /// A failed raft join within [`JOIN_PATIENCE`] of the first: reported at INFO the first
    /// time (a follower starting with its cluster meets it on every cold start), at DEBUG
    /// after, and true; false once it has failed for longer, so it is reported as an error.
    pub(super) fn join_patience(&self, since: &mut Option<Instant>, err: &PassError) -> bool {
        match since {
            None => {
                *since = Some(Instant::now());
                tracing::info!(
                    error = %err,
                    "could not join the raft cluster yet, as expected while its leader is not yet initialised and unsealed; trying again shortly"
                );
            }
            Some(first) if first.elapsed() < JOIN_PATIENCE => {
                tracing::debug!(error = %err, "raft join still failing");
            }
            Some(_) => return false,
        }
        true
    }
}
