//! Choosing which units a container should get (`GetPreferredAllocation`): pure logic.
//!
//! The kubelet offers a set of available units, a set it must keep (`must_include`) and a
//! count. The answer has exactly that many units, contains every `must_include` unit, and
//! keeps the container on as few sticks as possible: first the sticks it already has, then
//! the stick that fits the rest most tightly (so whole sticks stay free for later requests),
//! or, when no single stick fits, the emptiest sticks first.

use std::collections::{BTreeMap, HashSet};

/// Why no preferred allocation can be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreferredError {
    /// More units must be included than were asked for.
    #[error("must_include has {must} devices but allocation_size is {size}")]
    TooManyRequired {
        /// Number of distinct `must_include` units.
        must: usize,
        /// Requested allocation size.
        size: usize,
    },
    /// A unit the container must keep is not among the available ones.
    #[error("must_include device {0:?} is not in available_deviceIDs")]
    NotAvailable(String),
    /// Fewer units are available than were asked for.
    #[error("allocation_size {size} exceeds the {available} available devices")]
    NotEnough {
        /// Requested allocation size.
        size: usize,
        /// Units that could be chosen (available plus must_include).
        available: usize,
    },
}

/// Picks `size` units out of `available` ∪ `must_include`, including all of `must_include`,
/// packed onto as few sticks as possible. `stick_of` names the stick a unit belongs to.
pub fn preferred<F>(
    available: &[String],
    must_include: &[String],
    size: usize,
    stick_of: F,
) -> Result<Vec<String>, PreferredError>
where
    F: Fn(&str) -> String,
{
    // The answer only ever holds units the kubelet offered. Sets keep this linear: the
    // request may come from anyone able to reach the socket, with any number of IDs.
    let offered: HashSet<&str> = available.iter().map(String::as_str).collect();
    if let Some(missing) = must_include.iter().find(|u| !offered.contains(u.as_str())) {
        return Err(PreferredError::NotAvailable(crate::inventory::shown_id(
            missing,
        )));
    }
    let mut chosen: Vec<String> = Vec::with_capacity(size.min(available.len()));
    let mut taken: HashSet<&str> = HashSet::new();
    for unit in must_include {
        if taken.insert(unit.as_str()) {
            chosen.push(unit.clone());
        }
    }
    if chosen.len() > size {
        return Err(PreferredError::TooManyRequired {
            must: chosen.len(),
            size,
        });
    }

    // Free units grouped by stick, each group in share order.
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for unit in available {
        if taken.insert(unit.as_str()) {
            groups.entry(stick_of(unit)).or_default().push(unit.clone());
        }
    }
    for group in groups.values_mut() {
        group.sort_by(|a, b| share_key(a).cmp(&share_key(b)));
    }
    let free: usize = groups.values().map(Vec::len).sum();
    if chosen.len() + free < size {
        return Err(PreferredError::NotEnough {
            size,
            available: chosen.len() + free,
        });
    }

    let mut remaining = size - chosen.len();
    // Sticks the container already uses come first.
    let used: Vec<String> = chosen.iter().map(|u| stick_of(u)).collect();
    for stick in used {
        if remaining == 0 {
            break;
        }
        if let Some(group) = groups.remove(&stick) {
            take(&mut chosen, group, &mut remaining);
        }
    }
    while remaining > 0 {
        // Tightest single stick that covers the rest; otherwise the one with the most units.
        let best_fit = groups
            .iter()
            .filter(|(_, g)| g.len() >= remaining)
            .min_by_key(|(_, g)| g.len())
            .map(|(stick, _)| stick.clone());
        let pick = best_fit.or_else(|| {
            // max_by_key returns the last maximum; reverse keeps the first (lowest ID).
            groups
                .iter()
                .rev()
                .max_by_key(|(_, g)| g.len())
                .map(|(stick, _)| stick.clone())
        });
        let stick = pick.expect("enough free units were counted above");
        let group = groups.remove(&stick).expect("picked from the map");
        take(&mut chosen, group, &mut remaining);
    }
    Ok(chosen)
}

fn take(chosen: &mut Vec<String>, group: Vec<String>, remaining: &mut usize) {
    let n = group.len().min(*remaining);
    chosen.extend(group.into_iter().take(n));
    *remaining -= n;
}

/// Orders `X-2` before `X-10`.
fn share_key(unit: &str) -> (&str, u64) {
    match unit.rsplit_once('-') {
        Some((stick, n)) => (stick, n.parse().unwrap_or(u64::MAX)),
        None => (unit, u64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stick_of(unit: &str) -> String {
        unit.rsplit_once('-')
            .map(|(s, _)| s.to_owned())
            .unwrap_or_else(|| unit.to_owned())
    }

    fn v(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    fn pick(available: &[&str], must: &[&str], size: usize) -> Result<Vec<String>, PreferredError> {
        preferred(&v(available), &v(must), size, stick_of)
    }

    fn sticks(units: &[String]) -> Vec<String> {
        let mut s: Vec<String> = units.iter().map(|u| stick_of(u)).collect();
        s.sort();
        s.dedup();
        s
    }

    #[test]
    fn one_unit_prefers_a_partly_used_stick() {
        // B has one free unit left, A two: take B's so that A stays whole.
        assert_eq!(pick(&["A-0", "A-1", "B-1"], &[], 1).unwrap(), v(&["B-1"]));
    }

    #[test]
    fn two_units_on_one_stick() {
        let got = pick(&["A-0", "B-0", "A-1", "B-1"], &[], 2).unwrap();
        assert_eq!(got, v(&["A-0", "A-1"]));
        let got = pick(&["A-1", "B-0", "B-1", "C-0"], &[], 2).unwrap();
        assert_eq!(got, v(&["B-0", "B-1"]));
    }

    #[test]
    fn spreads_only_when_needed() {
        let got = pick(&["A-0", "A-1", "B-0", "C-0", "C-1", "C-2"], &[], 4).unwrap();
        // C (3) first, then the tightest fit for the last unit: B, which keeps A whole.
        assert_eq!(got, v(&["C-0", "C-1", "C-2", "B-0"]));
        assert_eq!(sticks(&got), v(&["B", "C"]));
    }

    #[test]
    fn must_include_comes_first_and_its_stick_is_reused() {
        let got = pick(&["A-0", "A-1", "B-0", "B-1"], &["B-1"], 2).unwrap();
        assert_eq!(got, v(&["B-1", "B-0"]));
        let got = pick(&["A-0", "A-1", "B-0", "B-1"], &["B-1", "A-0"], 2).unwrap();
        assert_eq!(got, v(&["B-1", "A-0"]));
        assert_eq!(
            pick(&["A-0", "A-1"], &["ghost-0"], 1),
            Err(PreferredError::NotAvailable("ghost-0".into())),
            "a unit that was not offered is never handed back"
        );
    }

    #[test]
    fn exact_size_and_errors() {
        for size in 0..=4 {
            let got = pick(&["A-0", "A-1", "B-0", "B-1"], &[], size).unwrap();
            assert_eq!(got.len(), size);
        }
        assert_eq!(
            pick(&["A-0"], &[], 2),
            Err(PreferredError::NotEnough {
                size: 2,
                available: 1
            })
        );
        assert_eq!(
            pick(&["A-0", "A-1"], &["A-0", "A-1"], 1),
            Err(PreferredError::TooManyRequired { must: 2, size: 1 })
        );
    }

    #[test]
    fn huge_requests_stay_cheap_and_bounded() {
        let available: Vec<String> = (0..10_000).map(|n| format!("S{n}-0")).collect();
        let got = preferred(&available, &available[..5_000], 5_000, stick_of).unwrap();
        assert_eq!(got.len(), 5_000);
        assert_eq!(
            preferred(&available[..2], &[], usize::MAX, stick_of),
            Err(PreferredError::NotEnough {
                size: usize::MAX,
                available: 2
            })
        );
        let long = "x".repeat(1 << 20);
        let err = preferred(&available[..2], &[long], 1, stick_of)
            .unwrap_err()
            .to_string();
        assert!(err.len() < 200, "{} bytes", err.len());
    }

    #[test]
    fn duplicates_and_share_order() {
        let got = pick(&["A-10", "A-2", "A-2", "A-1"], &[], 3).unwrap();
        assert_eq!(got, v(&["A-1", "A-2", "A-10"]));
    }
}
