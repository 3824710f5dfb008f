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
//!   was allocated the stick again.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Least time between two evictions, whatever the sticks.
pub const MIN_EVICTION_INTERVAL: Duration = Duration::from_secs(10);

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

/// An eviction under way: the pod, and when it was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InFlight {
    holder: Holder,
    since: Instant,
}

/// Pods to evict, per stick, and the rate limit.
#[derive(Debug, Default)]
pub struct Evictions {
    queues: BTreeMap<String, VecDeque<(Holder, Replug)>>,
    in_flight: BTreeMap<String, InFlight>,
    last: Option<Instant>,
}

impl Evictions {
    /// Queues every pod holding the replugged stick.
    pub fn replugged(&mut self, replug: &Replug, holders: &[Holder]) {
        let queue = self.queues.entry(replug.stick.clone()).or_default();
        for holder in holders {
            if !queue.iter().any(|(h, _)| h == holder) {
                queue.push_back((holder.clone(), replug.clone()));
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
            queue.retain(|(h, _)| current.contains(h));
        }
        self.queues.retain(|_, q| !q.is_empty());
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < MIN_EVICTION_INTERVAL)
        {
            return None;
        }
        let stick = self
            .queues
            .keys()
            .find(|stick| !self.in_flight.contains_key(*stick))?
            .clone();
        let queue = self.queues.get_mut(&stick)?;
        let (holder, replug) = queue.pop_front()?;
        self.in_flight.insert(
            stick,
            InFlight {
                holder: holder.clone(),
                since: now,
            },
        );
        self.last = Some(now);
        Some((holder, replug))
    }

    /// The eviction was refused (e.g. a PodDisruptionBudget): try that pod again later.
    pub fn refused(&mut self, holder: Holder, replug: Replug) {
        self.in_flight.remove(&replug.stick);
        self.queues
            .entry(replug.stick.clone())
            .or_default()
            .push_front((holder, replug));
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
        let mut ev = Evictions::default();
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
        let mut ev = Evictions::default();
        let holding = BTreeMap::from([("A".to_owned(), vec![h("vault-0"), h("config")])]);
        ev.replugged(&replug("A"), &holding["A"]);
        assert_eq!(ev.next(&holding, |_, _| false, t0).unwrap().0, h("vault-0"));
        let t1 = t0 + MIN_EVICTION_INTERVAL;
        // vault-0 is back under the same name, with a fresh Allocate after the eviction.
        let allocated = |stick: &str, since: Instant| stick == "A" && since == t0;
        assert_eq!(ev.next(&holding, allocated, t1).unwrap().0, h("config"));
    }

    #[test]
    fn refused_evictions_are_retried_and_vanished_pods_dropped() {
        let t0 = Instant::now();
        let mut ev = Evictions::default();
        let holding = BTreeMap::from([("A".to_owned(), vec![h("a1")])]);
        ev.replugged(&replug("A"), &holding["A"]);
        let (holder, r) = ev.next(&holding, |_, _| false, t0).unwrap();
        ev.refused(holder, r);
        let t1 = t0 + MIN_EVICTION_INTERVAL;
        assert_eq!(ev.next(&holding, |_, _| false, t1).unwrap().0, h("a1"));
        let mut ev = Evictions::default();
        ev.replugged(&replug("A"), &[h("a1")]);
        assert_eq!(ev.next(&BTreeMap::new(), |_, _| false, t0), None);
        assert!(!ev.busy());
    }
}
