//! What to do about running pods whose stick was unplugged and plugged back in: pure
//! decisions, no I/O (the I/O is in [`crate::recovery`]).
//!
//! The kubelet never calls `Allocate` again for a running container, so a pod that held a
//! stick keeps the device node and cgroup rule of the stick's *old* USB address after a
//! replug and cannot reach it any more. Depending on `onReplug`:
//!
//! - `none`: nothing (the metric still counts the replug);
//! - `event`: a Warning Event on each such pod says what happened and that it needs a restart;
//! - `evict`: each such pod is evicted through the Eviction API (so PodDisruptionBudgets
//!   hold), one pod at a time per stick and at most one eviction per `MIN_EVICTION_INTERVAL`
//!   overall; the next pod of a stick waits until the previous one is gone or its replacement
//!   was allocated the stick again. An eviction the API server refuses (a PodDisruptionBudget:
//!   HTTP 429) is tried again after [`EVICTION_RETRY_FIRST`], doubling up to
//!   [`EVICTION_RETRY_MAX`], while other sticks' pods go on; after `evictionRetryFor` of
//!   refusals the plugin gives up on that pod (and says so in an Event).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Least time between two evictions, whatever the sticks.
pub const MIN_EVICTION_INTERVAL: Duration = Duration::from_secs(10);
/// First wait before a refused eviction is tried again (`kubectl drain` waits 5 s as well).
pub const EVICTION_RETRY_FIRST: Duration = Duration::from_secs(5);
/// Longest wait between two tries of a refused eviction.
pub const EVICTION_RETRY_MAX: Duration = Duration::from_secs(60);

/// A stick that came back at another USB address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replug {
    /// Stick ID (the prefix of its unit IDs).
    pub stick: String,
    /// Serial number, or the stick ID without one.
    pub serial: String,
    /// The device node pods allocated before still use.
    pub old_path: String,
    /// The device node now.
    pub new_path: String,
}

impl Replug {
    /// The Event message for a pod that still uses the old device node.
    pub fn message(&self) -> String {
        format!(
            "stick {} re-plugged at {}; the pod still sees {}; restart it",
            self.serial, self.new_path, self.old_path
        )
    }
}

/// A container holding units of a stick.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Holder {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
}

/// Which pods hold units of which stick, from the kubelet's pod-resources list: stick ID →
/// pods, for `resource` only. A unit ID is `<stick>-<n>`.
pub fn holders(
    pods: &[nitrokey_proto::podresources_v1::PodResources],
    resource: &str,
) -> BTreeMap<String, Vec<Holder>> {
    let mut out: BTreeMap<String, Vec<Holder>> = BTreeMap::new();
    for pod in pods {
        let holder = Holder {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
        };
        for devices in pod
            .containers
            .iter()
            .flat_map(|c| &c.devices)
            .filter(|d| d.resource_name == resource)
        {
            for id in &devices.device_ids {
                let Some((stick, n)) = id.rsplit_once('-') else {
                    continue;
                };
                if n.parse::<u32>().is_err() {
                    continue;
                }
                let list = out.entry(stick.to_owned()).or_default();
                if !list.contains(&holder) {
                    list.push(holder.clone());
                }
            }
        }
    }
    out
}

/// How often a pod's eviction was refused, since when, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Refusals {
    count: u32,
    first: Option<Instant>,
    due: Option<Instant>,
}

/// A pod waiting for its eviction.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    holder: Holder,
    replug: Replug,
    refusals: Refusals,
}

/// An eviction under way: the pod, when it was asked for, and the rate limit's previous mark
/// (restored if the API server refuses it: a refusal evicted nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
struct InFlight {
    holder: Holder,
    since: Instant,
    refusals: Refusals,
    previous_last: Option<Instant>,
}

/// What becomes of a refused eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Tried again after this long (the stick's other pods wait; other sticks' do not).
    RetryIn(Duration),
    /// Refused for longer than the bound: dropped, the stick's next pod may go.
    GaveUp {
        /// Refusals in all.
        refusals: u32,
        /// Since the first refusal.
        since: Duration,
    },
}

/// Pods to evict, per stick, the rate limit and the bound on retrying refused evictions.
#[derive(Debug)]
pub struct Evictions {
    queues: BTreeMap<String, VecDeque<Pending>>,
    in_flight: BTreeMap<String, InFlight>,
    last: Option<Instant>,
    retry_for: Duration,
}

impl Evictions {
    /// Empty, giving up on a pod whose evictions were refused for `retry_for`.
    pub fn new(retry_for: Duration) -> Self {
        Self {
            queues: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            last: None,
            retry_for,
        }
    }

    /// Queues every pod holding the replugged stick.
    pub fn replugged(&mut self, replug: &Replug, holders: &[Holder]) {
        let queue = self.queues.entry(replug.stick.clone()).or_default();
        for holder in holders {
            if !queue.iter().any(|p| &p.holder == holder) {
                queue.push_back(Pending {
                    holder: holder.clone(),
                    replug: replug.clone(),
                    refusals: Refusals::default(),
                });
            }
        }
    }

    /// Whether anything is queued or under way (the caller keeps ticking while so).
    pub fn busy(&self) -> bool {
        self.queues.values().any(|q| !q.is_empty()) || !self.in_flight.is_empty()
    }

    /// The next pod to evict now, if any: `holders` is the current pod-resources view and
    /// `allocated_since(stick, t)` tells whether the stick was allocated after `t` (a
    /// replacement pod got the new device node). Call [`refused`](Self::refused) if the API
    /// server refuses the eviction.
    pub fn next(
        &mut self,
        holders: &BTreeMap<String, Vec<Holder>>,
        allocated_since: impl Fn(&str, Instant) -> bool,
        now: Instant,
    ) -> Option<(Holder, Replug)> {
        let none = Vec::new();
        // Evictions that finished: the pod is gone, or its replacement was allocated.
        self.in_flight.retain(|stick, f| {
            holders.get(stick).unwrap_or(&none).contains(&f.holder)
                && !allocated_since(stick, f.since)
        });
        // Pods that no longer hold the stick need nothing.
        for (stick, queue) in &mut self.queues {
            let current = holders.get(stick).unwrap_or(&none);
            queue.retain(|p| current.contains(&p.holder));
        }
        self.queues.retain(|_, q| !q.is_empty());
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < MIN_EVICTION_INTERVAL)
        {
            return None;
        }
        // A stick whose first pod waits to be tried again holds up only that stick.
        let stick = self
            .queues
            .iter()
            .find(|(stick, queue)| {
                !self.in_flight.contains_key(*stick)
                    && queue
                        .front()
                        .is_some_and(|p| p.refusals.due.is_none_or(|due| due <= now))
            })?
            .0
            .clone();
        let queue = self.queues.get_mut(&stick)?;
        let pending = queue.pop_front()?;
        self.in_flight.insert(
            stick,
            InFlight {
                holder: pending.holder.clone(),
                since: now,
                refusals: pending.refusals,
                previous_last: self.last,
            },
        );
        self.last = Some(now);
        Some((pending.holder, pending.replug))
    }

    /// The eviction [`next`](Self::next) handed out was refused (e.g. by a
    /// PodDisruptionBudget) at `now`: that pod is tried again later, first in its stick's
    /// queue, unless it has been refused for the bound given to [`new`](Self::new).
    pub fn refused(&mut self, holder: Holder, replug: Replug, now: Instant) -> Refused {
        let mut refusals = Refusals::default();
        if let Some(f) = self.in_flight.remove(&replug.stick) {
            if f.holder == holder {
                refusals = f.refusals;
            }
            self.last = f.previous_last;
        }
        refusals.count += 1;
        let first = *refusals.first.get_or_insert(now);
        let since = now.duration_since(first);
        if since >= self.retry_for {
            return Refused::GaveUp {
                refusals: refusals.count,
                since,
            };
        }
        let wait = EVICTION_RETRY_FIRST
            .saturating_mul(2u32.saturating_pow(refusals.count - 1))
            .min(EVICTION_RETRY_MAX);
        refusals.due = Some(now + wait);
        self.queues
            .entry(replug.stick.clone())
            .or_default()
            .push_front(Pending {
                holder,
                replug,
                refusals,
            });
        Refused::RetryIn(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nitrokey_proto::podresources_v1::{ContainerDevices, ContainerResources, PodResources};

    fn pod(ns: &str, name: &str, resource: &str, ids: &[&str]) -> PodResources {
        PodResources {
            name: name.into(),
            namespace: ns.into(),
            containers: vec![ContainerResources {
                name: "c".into(),
                devices: vec![ContainerDevices {
                    resource_name: resource.into(),
                    device_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
                    topology: None,
                }],
                ..Default::default()
            }],
        }
    }

    fn h(name: &str) -> Holder {
        Holder {
            namespace: "vault".into(),
            pod: name.into(),
        }
    }

    fn replug(stick: &str) -> Replug {
        Replug {
            stick: stick.into(),
            serial: stick.into(),
            old_path: "/dev/bus/usb/001/002".into(),
            new_path: "/dev/bus/usb/001/007".into(),
        }
    }

    #[test]
    fn holders_by_stick_for_our_resource_only() {
        let pods = [
            pod("vault", "vault-0", "nitrokey.com/hsm", &["DENK1-0"]),
            pod(
                "vault",
                "config",
                "nitrokey.com/hsm",
                &["DENK1-1", "DENK-2-0"],
            ),
            pod("gpu", "train", "nvidia.com/gpu", &["DENK1-0"]),
        ];
        let by_stick = holders(&pods, "nitrokey.com/hsm");
        assert_eq!(by_stick["DENK1"], vec![h("vault-0"), h("config")]);
        assert_eq!(by_stick["DENK-2"], vec![h("config")]);
        assert_eq!(by_stick.len(), 2);
    }

    #[test]
    fn message_names_stick_and_both_paths() {
        assert_eq!(
            replug("DENK1").message(),
            "stick DENK1 re-plugged at /dev/bus/usb/001/007; the pod still sees \
             /dev/bus/usb/001/002; restart it"
        );
    }

    #[test]
    fn one_pod_per_stick_at_a_time_and_rate_limited() {
        let t0 = Instant::now();
        let mut ev = Evictions::new(Duration::from_secs(600));
        let mut now_holding = BTreeMap::from([
            ("A".to_owned(), vec![h("a1"), h("a2")]),
            ("B".to_owned(), vec![h("b1")]),
        ]);
        ev.replugged(&replug("A"), &now_holding["A"]);
        ev.replugged(&replug("B"), &now_holding["B"]);
        let never = |_: &str, _: Instant| false;
        assert_eq!(ev.next(&now_holding, never, t0).unwrap().0, h("a1"));
        // Rate limit: nothing else within the interval, even for another stick.
        assert_eq!(
            ev.next(&now_holding, never, t0 + Duration::from_secs(1)),
            None
        );
        let t1 = t0 + MIN_EVICTION_INTERVAL;
        // Stick A still has a1 under way: B goes next, a2 waits.
        assert_eq!(ev.next(&now_holding, never, t1).unwrap().0, h("b1"));
        let t2 = t1 + MIN_EVICTION_INTERVAL;
        assert_eq!(ev.next(&now_holding, never, t2), None, "a1 is not gone yet");
        // a1 is gone: a2 may go.
        now_holding.get_mut("A").unwrap().retain(|x| x != &h("a1"));
        assert_eq!(ev.next(&now_holding, never, t2).unwrap().0, h("a2"));
        assert!(ev.busy());
    }

    #[test]
    fn a_replacement_with_the_same_name_that_was_allocated_again_counts_as_done() {
        let t0 = Instant::now();
        let mut ev = Evictions::new(Duration::from_secs(600));
        let holding = BTreeMap::from([("A".to_owned(), vec![h("vault-0"), h("config")])]);
        ev.replugged(&replug("A"), &holding["A"]);
        assert_eq!(ev.next(&holding, |_, _| false, t0).unwrap().0, h("vault-0"));
        let t1 = t0 + MIN_EVICTION_INTERVAL;
        // vault-0 is back under the same name, with a fresh Allocate after the eviction.
        let allocated = |stick: &str, since: Instant| stick == "A" && since == t0;
        assert_eq!(ev.next(&holding, allocated, t1).unwrap().0, h("config"));
    }

    #[test]
    fn refused_evictions_back_off_hold_up_only_their_stick_and_give_up_after_the_bound() {
        let t0 = Instant::now();
        let mut ev = Evictions::new(Duration::from_secs(300));
        let holding = BTreeMap::from([
            ("A".to_owned(), vec![h("a1"), h("a2")]),
            ("B".to_owned(), vec![h("b1")]),
        ]);
        let never = |_: &str, _: Instant| false;
        ev.replugged(&replug("A"), &holding["A"]);
        let (holder, r) = ev.next(&holding, never, t0).unwrap();
        assert_eq!(holder, h("a1"));
        assert_eq!(
            ev.refused(holder, r, t0),
            Refused::RetryIn(EVICTION_RETRY_FIRST)
        );
        // A refusal evicted nothing: no rate limit, but a1 waits and a2 waits behind it.
        assert_eq!(ev.next(&holding, never, t0), None);
        // Another stick's pod goes at once.
        ev.replugged(&replug("B"), &holding["B"]);
        assert_eq!(ev.next(&holding, never, t0).unwrap().0, h("b1"));
        // a1 is due again after the first wait (and the rate limit), then waits twice as long.
        let t1 = t0 + MIN_EVICTION_INTERVAL;
        let (holder, r) = ev.next(&holding, never, t1).unwrap();
        assert_eq!(holder, h("a1"));
        assert_eq!(
            ev.refused(holder, r, t1),
            Refused::RetryIn(EVICTION_RETRY_FIRST * 2)
        );
        assert_eq!(ev.next(&holding, never, t1 + EVICTION_RETRY_FIRST), None);
        // Waits never exceed the maximum.
        let mut t = t1 + EVICTION_RETRY_FIRST * 2;
        let mut waits = Vec::new();
        while let Some((holder, r)) = ev.next(&holding, never, t) {
            assert_eq!(holder, h("a1"));
            match ev.refused(holder, r, t) {
                Refused::RetryIn(wait) => {
                    waits.push(wait);
                    t += wait;
                }
                Refused::GaveUp { refusals, since } => {
                    assert!(since >= Duration::from_secs(300), "{since:?}");
                    assert_eq!(refusals as usize, waits.len() + 3);
                    break;
                }
            }
        }
        assert!(waits.iter().all(|w| *w <= EVICTION_RETRY_MAX), "{waits:?}");
        assert_eq!(waits.last(), Some(&EVICTION_RETRY_MAX), "{waits:?}");
        // Given up on a1: the stick's next pod goes.
        assert_eq!(ev.next(&holding, never, t).unwrap().0, h("a2"));
    }

    #[test]
    fn a_zero_bound_gives_up_at_the_first_refusal_and_vanished_pods_are_dropped() {
        let t0 = Instant::now();
        let mut ev = Evictions::new(Duration::ZERO);
        let holding = BTreeMap::from([("A".to_owned(), vec![h("a1")])]);
        ev.replugged(&replug("A"), &holding["A"]);
        let (holder, r) = ev.next(&holding, |_, _| false, t0).unwrap();
        assert_eq!(
            ev.refused(holder, r, t0),
            Refused::GaveUp {
                refusals: 1,
                since: Duration::ZERO
            }
        );
        assert!(!ev.busy());
        let mut ev = Evictions::new(Duration::from_secs(600));
        ev.replugged(&replug("A"), &[h("a1")]);
        assert_eq!(ev.next(&BTreeMap::new(), |_, _| false, t0), None);
        assert!(!ev.busy());
    }
}
