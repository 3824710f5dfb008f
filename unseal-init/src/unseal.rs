//! The unseal state machine: given what Vault reports and what the store holds, decide the
//! next step. Pure, so every branch is tested without a Vault or a token.

/// What the last look at Vault and the store showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// Vault's status, or `None` when it did not answer.
    pub vault: Option<VaultView>,
    /// `vault-unseal-N` keys in the store; `None` when the store was not looked at because
    /// no decision needs it (see [`store_needed`]).
    pub stored_keys: Option<usize>,
    /// A raft leader address is configured (this Vault is a follower).
    pub raft_follower: bool,
    /// One of the configured raft peers answers initialised: the cluster exists, and this
    /// uninitialised Vault is a member that lost its data.
    pub initialized_peer: bool,
    /// Stale keys may be overwritten by a new init.
    pub overwrite_existing_keys: bool,
}

/// Vault's seal status as far as decisions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaultView {
    /// Initialised.
    pub initialized: bool,
    /// Sealed.
    pub sealed: bool,
    /// Keys needed to unseal.
    pub threshold: u32,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Vault is not answering yet: wait and look again.
    WaitForVault,
    /// Initialise Vault, store every key (and the root token), then unseal.
    Initialize,
    /// Join the raft leader, then unseal with the stored keys.
    JoinRaft,
    /// Join the raft peer that answered initialised, then unseal with the stored keys: a
    /// member that lost its data rejoins its cluster instead of starting one of its own.
    JoinPeer,
    /// Reset progress and submit `threshold` stored keys.
    Unseal {
        /// Keys to submit.
        threshold: u32,
    },
    /// Vault is initialised and unsealed.
    Done,
    /// Refuse: unseal keys of an earlier Vault are in the store and Vault is uninitialised.
    RefuseStaleKeys {
        /// Keys found.
        found: usize,
    },
    /// Vault is sealed but the store lacks enough keys.
    MissingKeys {
        /// Keys needed.
        needed: u32,
        /// Keys stored.
        found: usize,
    },
}

/// Whether deciding needs to know what the store holds. An unsealed Vault needs nothing from
/// the store (nor does a follower about to join), so a watch pass then costs the token — and
/// the Kubernetes API — nothing.
pub fn store_needed(vault: Option<VaultView>, raft_follower: bool) -> bool {
    match vault {
        None => false,
        Some(v) if v.initialized => v.sealed,
        Some(_) => !raft_follower,
    }
}

/// Decides the next step.
pub fn next_step(obs: &Observation) -> Step {
    let Some(v) = obs.vault else {
        return Step::WaitForVault;
    };
    let stored_keys = obs.stored_keys.unwrap_or(0);
    match (v.initialized, v.sealed) {
        (true, false) => Step::Done,
        (false, _) if obs.raft_follower => Step::JoinRaft,
        // Before any init and before anything is said about stale keys: initialising here
        // would start a second cluster and, with a shared store, replace the first one's keys.
        (false, _) if obs.initialized_peer => Step::JoinPeer,
        (false, _) if stored_keys > 0 && !obs.overwrite_existing_keys => {
            Step::RefuseStaleKeys { found: stored_keys }
        }
        (false, _) => Step::Initialize,
        (true, true) if stored_keys >= v.threshold as usize && v.threshold > 0 => Step::Unseal {
            threshold: v.threshold,
        },
        (true, true) => Step::MissingKeys {
            needed: v.threshold,
            found: stored_keys,
        },
    }
}

/// What to do when Vault is sealed and the store holds fewer readable keys than it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShortOfKeys {
    /// Look again shortly: the keys may still be on their way.
    Wait,
    /// Nothing is on its way, or the wait is over: report it.
    Fail,
}

/// Decides whether keys missing from the store may still arrive. `needed == 0` means Vault
/// reports no threshold yet: someone is initialising it right now. With a `shared` store
/// (mode hsm-k8s: one Secret for every initialiser) another initialiser's keys land in it
/// moments after its `sys/init`; a store of this process's own (mode hsm: its token) receives
/// nobody else's. Waiting ends once `waited` reaches `limit`.
pub fn short_of_keys(
    needed: u32,
    shared: bool,
    waited: std::time::Duration,
    limit: std::time::Duration,
) -> ShortOfKeys {
    if waited < limit && (needed == 0 || shared) {
        ShortOfKeys::Wait
    } else {
        ShortOfKeys::Fail
    }
}

/// How a sidecar paces its next pass after the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// The regular `unsealPeriod`.
    Period,
    /// Something that fixes itself within moments (Vault not listening yet, a raft leader not
    /// yet able to take members): from [`SOON_FIRST`], doubling, never beyond the period.
    Soon,
    /// A failure that repeats exactly until someone acts (stored keys this stick cannot
    /// decrypt): from the period, doubling, up to [`SLOWEST`], so a stick with the wrong key
    /// costs a handful of card operations an hour instead of a few every period.
    Slower,
}

/// First delay of [`Pace::Soon`].
pub const SOON_FIRST: std::time::Duration = std::time::Duration::from_millis(50);
/// Longest delay of [`Pace::Slower`] (unless the period itself is longer).
pub const SLOWEST: std::time::Duration = std::time::Duration::from_secs(600);

/// The delays between passes: each pace backs off on its own and starts afresh whenever the
/// pace changes. Pure; the caller sleeps.
#[derive(Debug, Clone)]
pub struct Pacer {
    period: std::time::Duration,
    last: Pace,
    soon: nitrokey_common::backoff::Backoff,
    slower: nitrokey_common::backoff::Backoff,
}

impl Pacer {
    /// Pacing for `unsealPeriod` `period`.
    pub fn new(period: std::time::Duration) -> Self {
        use nitrokey_common::backoff::Backoff;
        Self {
            period,
            last: Pace::Period,
            soon: Backoff::new(SOON_FIRST, period),
            slower: Backoff::new(period, SLOWEST.max(period)),
        }
    }

    /// The delay before the next pass, given how the last one ended.
    pub fn next(&mut self, pace: Pace) -> std::time::Duration {
        if pace != self.last {
            self.soon.reset();
            self.slower.reset();
            self.last = pace;
        }
        match pace {
            Pace::Period => self.period,
            Pace::Soon => self.soon.next(),
            Pace::Slower => self.slower.next(),
        }
    }
}

/// True for Vault's answer to a `sys/init` that another initialiser beat.
pub fn already_initialised(message: &str) -> bool {
    message.to_ascii_lowercase().contains("already initialized")
}

/// Order in which `sys/init`'s results are stored: every unseal key, then the root token.
/// Nothing is unsealed before all of them are stored.
pub fn init_storage_plan(shares: usize, store_root_token: bool) -> Vec<String> {
    let mut plan: Vec<String> = (0..shares).map(crate::keyring::unseal_key_name).collect();
    if store_root_token {
        plan.push(crate::keyring::ROOT_KEY.to_owned());
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(vault: Option<(bool, bool, u32)>, stored: usize) -> Observation {
        Observation {
            vault: vault.map(|(initialized, sealed, threshold)| VaultView {
                initialized,
                sealed,
                threshold,
            }),
            stored_keys: Some(stored),
            raft_follower: false,
            initialized_peer: false,
            overwrite_existing_keys: false,
        }
    }

    #[test]
    fn unreachable_vault_is_waited_for() {
        assert_eq!(next_step(&obs(None, 5)), Step::WaitForVault);
    }

    #[test]
    fn fresh_vault_with_empty_store_is_initialised() {
        assert_eq!(next_step(&obs(Some((false, true, 0)), 0)), Step::Initialize);
    }

    #[test]
    fn stale_keys_block_init_unless_overwrite_is_allowed() {
        let mut o = obs(Some((false, true, 0)), 5);
        assert_eq!(next_step(&o), Step::RefuseStaleKeys { found: 5 });
        o.overwrite_existing_keys = true;
        assert_eq!(next_step(&o), Step::Initialize);
    }

    #[test]
    fn sealed_vault_is_unsealed_with_threshold_keys() {
        assert_eq!(
            next_step(&obs(Some((true, true, 3)), 5)),
            Step::Unseal { threshold: 3 }
        );
        assert_eq!(
            next_step(&obs(Some((true, true, 3)), 2)),
            Step::MissingKeys {
                needed: 3,
                found: 2
            }
        );
    }

    #[test]
    fn unsealed_vault_needs_nothing() {
        assert_eq!(next_step(&obs(Some((true, false, 3)), 5)), Step::Done);
        assert_eq!(next_step(&obs(Some((true, false, 3)), 0)), Step::Done);
        let mut o = obs(Some((true, false, 3)), 0);
        o.stored_keys = None;
        assert_eq!(next_step(&o), Step::Done);
    }

    #[test]
    fn the_store_is_read_only_when_a_decision_needs_it() {
        let v = |initialized, sealed| {
            Some(VaultView {
                initialized,
                sealed,
                threshold: 3,
            })
        };
        assert!(!store_needed(v(true, false), false), "unsealed: idle");
        assert!(!store_needed(None, false), "unreachable: wait");
        assert!(store_needed(v(true, true), false), "sealed: keys");
        assert!(
            store_needed(v(false, true), false),
            "uninitialised: stale keys?"
        );
        assert!(!store_needed(v(false, true), true), "follower joins first");
        assert!(store_needed(v(true, true), true), "joined follower unseals");
    }

    #[test]
    fn raft_follower_joins_instead_of_initialising() {
        let mut o = obs(Some((false, true, 0)), 5);
        o.raft_follower = true;
        assert_eq!(next_step(&o), Step::JoinRaft);
        // After joining, the follower is initialised and sealed: unseal.
        let mut o = obs(Some((true, true, 3)), 5);
        o.raft_follower = true;
        assert_eq!(next_step(&o), Step::Unseal { threshold: 3 });
    }

    #[test]
    fn a_member_whose_peers_form_a_cluster_rejoins_and_never_initialises() {
        for (stored, overwrite) in [(0, false), (5, false), (5, true)] {
            let mut o = obs(Some((false, true, 0)), stored);
            o.initialized_peer = true;
            o.overwrite_existing_keys = overwrite;
            assert_eq!(
                next_step(&o),
                Step::JoinPeer,
                "{stored} stored keys, overwrite {overwrite}"
            );
        }
        // Once joined it is initialised and sealed: the stored keys unseal it.
        let mut o = obs(Some((true, true, 3)), 5);
        o.initialized_peer = true;
        assert_eq!(next_step(&o), Step::Unseal { threshold: 3 });
        // No peer answering initialised: as before.
        assert_eq!(
            next_step(&obs(Some((false, true, 0)), 5)),
            Step::RefuseStaleKeys { found: 5 }
        );
    }

    #[test]
    fn passes_are_paced_from_milliseconds_or_backed_off_from_the_period() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        let mut p = Pacer::new(ms(1000));
        assert_eq!(p.next(Pace::Period), ms(1000));
        // Vault not listening yet: from milliseconds, never beyond the period.
        let soon: Vec<_> = (0..7).map(|_| p.next(Pace::Soon)).collect();
        assert_eq!(
            soon,
            [
                ms(50),
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1000),
                ms(1000)
            ]
        );
        // Keys the stick cannot decrypt: from the period up to the slowest pace.
        let slower: Vec<_> = (0..12).map(|_| p.next(Pace::Slower)).collect();
        assert_eq!(slower[..4], [ms(1000), ms(2000), ms(4000), ms(8000)]);
        assert_eq!(slower[11], SLOWEST);
        // Each pace starts afresh after another.
        assert_eq!(p.next(Pace::Period), ms(1000));
        assert_eq!(p.next(Pace::Soon), ms(50));
        assert_eq!(p.next(Pace::Slower), ms(1000));
        // A period longer than the slowest pace is never shortened.
        let mut long = Pacer::new(Duration::from_secs(3600));
        assert_eq!(long.next(Pace::Slower), Duration::from_secs(3600));
    }

    #[test]
    fn root_token_is_stored_after_every_unseal_key() {
        assert_eq!(
            init_storage_plan(3, true),
            [
                "vault-unseal-0",
                "vault-unseal-1",
                "vault-unseal-2",
                "vault-root"
            ]
        );
        assert_eq!(init_storage_plan(1, false), ["vault-unseal-0"]);
    }

    #[test]
    fn missing_keys_are_awaited_only_where_they_can_arrive() {
        use std::time::Duration;
        let (limit, early, late) = (
            Duration::from_secs(120),
            Duration::from_secs(1),
            Duration::from_secs(120),
        );
        // Vault being initialised by someone else: no threshold yet, in either mode.
        assert_eq!(short_of_keys(0, false, early, limit), ShortOfKeys::Wait);
        assert_eq!(short_of_keys(0, true, early, limit), ShortOfKeys::Wait);
        // Initialised: only a shared store can still receive its keys.
        assert_eq!(short_of_keys(3, true, early, limit), ShortOfKeys::Wait);
        assert_eq!(short_of_keys(3, false, early, limit), ShortOfKeys::Fail);
        // Never for ever.
        assert_eq!(short_of_keys(0, true, late, limit), ShortOfKeys::Fail);
        assert_eq!(short_of_keys(3, true, late, limit), ShortOfKeys::Fail);
        assert!(already_initialised("Vault is already initialized"));
        assert!(!already_initialised("invalid seal configuration"));
    }
}
