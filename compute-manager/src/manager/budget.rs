//! The memory budget of frozen computes (`max_frozen_memory`): which to stop, least recently
//! used first, so that the ones left fit. Pure, so that the order is tested without computes.

use tokio::time::Instant;

/// One frozen compute as the budget sees it: when it was last used, and what it holds
/// (`None`: unknown, counted as nothing and never stopped for the budget, as there is
/// nothing to go by).
#[derive(Debug, Clone, Copy)]
pub(super) struct Frozen {
    pub(super) last_used: Instant,
    pub(super) memory: Option<u64>,
}

/// Indexes into `frozen` of the computes to stop, in the order to stop them: the least
/// recently used first, until the rest hold at most `budget` bytes. A budget of 0 is none.
pub(super) fn evictions(frozen: &[Frozen], budget: u64) -> Vec<usize> {
    if budget == 0 {
        return Vec::new();
    }
    let mut total: u64 = frozen
        .iter()
        .fold(0, |t, f| t.saturating_add(f.memory.unwrap_or(0)));
    let mut order: Vec<usize> = (0..frozen.len()).collect();
    order.sort_by_key(|&i| frozen[i].last_used);
    let mut out = Vec::new();
    for i in order {
        if total <= budget {
            break;
        }
        // Stopping one of unknown size frees nothing the budget can count.
        if let Some(m) = frozen[i].memory {
            total = total.saturating_sub(m);
            out.push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(t0: Instant, secs: u64, mib: u64) -> Frozen {
        Frozen {
            last_used: t0 + Duration::from_secs(secs),
            memory: Some(mib << 20),
        }
    }

    #[test]
    fn the_least_recently_used_go_first_until_the_rest_fit() {
        let t0 = Instant::now();
        // Index order is not age order: c (index 2) is the oldest.
        let frozen = [
            at(t0, 20, 10),
            at(t0, 30, 10),
            at(t0, 10, 10),
            at(t0, 40, 10),
        ];
        assert_eq!(evictions(&frozen, 40 << 20), Vec::<usize>::new());
        assert_eq!(evictions(&frozen, 39 << 20), vec![2]);
        assert_eq!(evictions(&frozen, 20 << 20), vec![2, 0]);
        assert_eq!(evictions(&frozen, 1), vec![2, 0, 1, 3]);
    }

    #[test]
    fn no_budget_stops_nothing_and_unknown_memory_counts_nothing() {
        let t0 = Instant::now();
        let frozen = [
            Frozen {
                last_used: t0,
                memory: None,
            },
            at(t0, 5, 30),
        ];
        assert!(evictions(&frozen, 0).is_empty());
        assert!(evictions(&frozen, 30 << 20).is_empty());
        // The unknown one is older, but stopping it frees nothing countable.
        assert_eq!(evictions(&frozen, 10 << 20), vec![1]);
        assert!(evictions(&[], 1).is_empty());
    }
}
