//! GetPreferredAllocation's choice, as a pure function: keep `must_include`, stay on one
//! NUMA node when one can hold the request (the node the must-include devices are on, else
//! the one that fits most tightly), then by policy either pack replicas of one physical
//! device before taking another, or spread across physical devices.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::AllocationPolicy;

/// A device that may be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// The device (replica) ID.
    pub id: &'a str,
    /// Its physical device.
    pub physical: &'a str,
    /// Its NUMA node, when known.
    pub numa: Option<u32>,
}

/// Chooses `size` devices: every one of `must_include` (in order), then from `available`
/// (in the order given, which breaks ties). Returns fewer when too few are available.
pub fn choose(
    available: &[Candidate<'_>],
    must_include: &[Candidate<'_>],
    size: usize,
    policy: AllocationPolicy,
) -> Vec<String> {
    let mut chosen: Vec<Candidate<'_>> = Vec::new();
    for m in must_include {
        if !chosen.iter().any(|c| c.id == m.id) {
            chosen.push(*m);
        }
    }
    let need = size.saturating_sub(chosen.len());
    let pool: Vec<Candidate<'_>> = available
        .iter()
        .filter(|a| !chosen.iter().any(|c| c.id == a.id))
        .copied()
        .collect();
    let mut remaining = need;
    for group in numa_order(&pool, &chosen, need) {
        if remaining == 0 {
            break;
        }
        let picked = pick(&group, &chosen, remaining, policy);
        remaining -= picked.len();
        chosen.extend(picked);
    }
    chosen.into_iter().map(|c| c.id.to_string()).collect()
}

/// The pool split by NUMA node, in the order to draw from.
fn numa_order<'a>(
    pool: &[Candidate<'a>],
    chosen: &[Candidate<'a>],
    need: usize,
) -> Vec<Vec<Candidate<'a>>> {
    let mut groups: BTreeMap<Option<u32>, Vec<Candidate<'a>>> = BTreeMap::new();
    for c in pool {
        groups.entry(c.numa).or_default().push(*c);
    }
    let chosen_numas: BTreeSet<Option<u32>> = chosen.iter().map(|c| c.numa).collect();
    let home = match chosen_numas.iter().collect::<Vec<_>>().as_slice() {
        [Some(n)] => Some(*n),
        _ => None,
    };
    let mut order: Vec<(Option<u32>, Vec<Candidate<'a>>)> = groups.into_iter().collect();
    // Key: (not home, does not fit, size for best fit or negative size for largest first,
    // unknown NUMA last, node).
    order.sort_by_key(|(numa, group)| {
        let fits = group.len() >= need;
        let size_key = if fits {
            group.len() as i64
        } else {
            -(group.len() as i64)
        };
        let is_home = home.is_some() && *numa == home;
        (!is_home, !fits, size_key, numa.is_none(), *numa)
    });
    order.into_iter().map(|(_, g)| g).collect()
}

/// Picks up to `k` devices of `group` by `policy`, given what is already chosen.
fn pick<'a>(
    group: &[Candidate<'a>],
    chosen: &[Candidate<'a>],
    k: usize,
    policy: AllocationPolicy,
) -> Vec<Candidate<'a>> {
    // Free replicas per physical device, in first-seen order.
    let mut free: Vec<(&'a str, Vec<Candidate<'a>>)> = Vec::new();
    for c in group {
        match free.iter_mut().find(|(p, _)| *p == c.physical) {
            Some((_, list)) => list.push(*c),
            None => free.push((c.physical, vec![*c])),
        }
    }
    let mut used: BTreeMap<&str, usize> = BTreeMap::new();
    for c in chosen {
        *used.entry(c.physical).or_default() += 1;
    }
    let mut out = Vec::new();
    while out.len() < k {
        let left = k - out.len();
        let next = match policy {
            AllocationPolicy::Pack => pack_next(&free, &used, left),
            AllocationPolicy::Spread => spread_next(&free, &used),
        };
        let Some(i) = next else { break };
        let take = match policy {
            AllocationPolicy::Pack => left.min(free[i].1.len()),
            AllocationPolicy::Spread => 1,
        };
        let (physical, list) = &mut free[i];
        for c in list.drain(..take) {
            *used.entry(physical).or_default() += 1;
            out.push(c);
        }
    }
    out
}

/// Pack: a physical device already in use, else the one that fits the rest most tightly,
/// else the one with the most free replicas.
fn pack_next(
    free: &[(&str, Vec<Candidate<'_>>)],
    used: &BTreeMap<&str, usize>,
    left: usize,
) -> Option<usize> {
    let open = |i: &usize| !free[*i].1.is_empty();
    let indices = 0..free.len();
    if let Some(i) = indices
        .clone()
        .filter(open)
        .find(|i| used.contains_key(free[*i].0))
    {
        return Some(i);
    }
    let tightest = indices
        .clone()
        .filter(open)
        .filter(|i| free[*i].1.len() >= left)
        .min_by_key(|i| free[*i].1.len());
    tightest.or_else(|| {
        indices
            .filter(open)
            .max_by_key(|i| (free[*i].1.len(), std::cmp::Reverse(*i)))
    })
}

/// Spread: the physical device with the fewest replicas chosen, then the most free.
fn spread_next(free: &[(&str, Vec<Candidate<'_>>)], used: &BTreeMap<&str, usize>) -> Option<usize> {
    (0..free.len())
        .filter(|i| !free[*i].1.is_empty())
        .min_by_key(|i| {
            let in_use = used.get(free[*i].0).copied().unwrap_or(0);
            (in_use, std::cmp::Reverse(free[*i].1.len()), *i)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use AllocationPolicy::{Pack, Spread};

    /// `spec` is (physical, replicas, numa).
    fn devices(
        spec: &[(&'static str, usize, Option<u32>)],
    ) -> Vec<(String, &'static str, Option<u32>)> {
        let mut out = Vec::new();
        for (physical, replicas, numa) in spec {
            for r in 0..*replicas {
                let id = if *replicas == 1 {
                    physical.to_string()
                } else {
                    format!("{physical}::{r}")
                };
                out.push((id, *physical, *numa));
            }
        }
        out
    }

    fn run(
        all: &[(String, &'static str, Option<u32>)],
        available: &[&str],
        must: &[&str],
        size: usize,
        policy: AllocationPolicy,
    ) -> Vec<String> {
        let cand = |ids: &[&str]| -> Vec<Candidate<'_>> {
            ids.iter()
                .map(|id| {
                    let (id, physical, numa) = all.iter().find(|d| d.0 == *id).unwrap();
                    Candidate {
                        id,
                        physical,
                        numa: *numa,
                    }
                })
                .collect()
        };
        let available = cand(available);
        let must = cand(must);
        let mut out = choose(&available, &must, size, policy);
        out.sort();
        out
    }

    fn ids<'a>(all: &'a [(String, &'static str, Option<u32>)]) -> Vec<&'a str> {
        all.iter().map(|d| d.0.as_str()).collect()
    }

    #[test]
    fn must_include_is_kept_and_counted() {
        let all = devices(&[("a", 1, None), ("b", 1, None), ("c", 1, None)]);
        assert_eq!(run(&all, &ids(&all), &["c"], 2, Pack), ["a", "c"]);
        assert_eq!(run(&all, &ids(&all), &["c", "b"], 2, Pack), ["b", "c"]);
        assert_eq!(run(&all, &ids(&all), &["c", "b"], 1, Pack), ["b", "c"]);
    }

    #[test]
    fn one_numa_node_is_preferred_tightest_fit_first() {
        let all = devices(&[
            ("g0", 1, Some(0)),
            ("g1", 1, Some(0)),
            ("g2", 1, Some(1)),
            ("g3", 1, Some(1)),
            ("g4", 1, Some(1)),
        ]);
        // Node 0 holds exactly two; node 1 has three.
        assert_eq!(run(&all, &ids(&all), &[], 2, Pack), ["g0", "g1"]);
        assert_eq!(run(&all, &ids(&all), &[], 3, Pack), ["g2", "g3", "g4"]);
        // g1 is taken: node 0 cannot hold two any more.
        assert_eq!(
            run(&all, &["g0", "g2", "g3", "g4"], &[], 2, Pack),
            ["g2", "g3"]
        );
        // The must-include device's node wins even when another fits more tightly.
        assert_eq!(run(&all, &ids(&all), &["g4"], 2, Pack), ["g2", "g4"]);
        // Too big for one node: the largest node first, then the next.
        let four = run(&all, &ids(&all), &[], 4, Pack);
        assert_eq!(
            four.iter()
                .filter(|d| ["g2", "g3", "g4"].contains(&d.as_str()))
                .count(),
            3
        );
        assert_eq!(four.len(), 4);
    }

    #[test]
    fn pack_fills_one_physical_device_before_the_next() {
        let all = devices(&[("a", 4, None), ("b", 4, None)]);
        assert_eq!(run(&all, &ids(&all), &[], 2, Pack), ["a::0", "a::1"]);
        // b is half used elsewhere: its two free replicas fit exactly.
        let avail = ["a::0", "a::1", "a::2", "a::3", "b::2", "b::3"];
        assert_eq!(run(&all, &avail, &[], 2, Pack), ["b::2", "b::3"]);
        // Five need both: all of the largest, then one more.
        assert_eq!(run(&all, &ids(&all), &[], 5, Pack).len(), 5);
        // A must-include replica pulls its siblings.
        assert_eq!(run(&all, &ids(&all), &["b::1"], 2, Pack), ["b::0", "b::1"]);
    }

    #[test]
    fn spread_takes_one_replica_of_each_physical_device_first() {
        let all = devices(&[("a", 4, None), ("b", 4, None), ("c", 4, None)]);
        assert_eq!(run(&all, &ids(&all), &[], 2, Spread), ["a::0", "b::0"]);
        assert_eq!(
            run(&all, &ids(&all), &[], 4, Spread),
            ["a::0", "a::1", "b::0", "c::0"]
        );
        assert_eq!(
            run(&all, &ids(&all), &["a::3"], 2, Spread),
            ["a::3", "b::0"]
        );
    }

    #[test]
    fn too_few_available_returns_what_there_is() {
        let all = devices(&[("a", 2, None)]);
        assert_eq!(run(&all, &ids(&all), &[], 5, Pack), ["a::0", "a::1"]);
        assert!(run(&all, &[], &[], 0, Spread).is_empty());
    }
}
