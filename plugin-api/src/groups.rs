//! Which out-projection columns are removed together.

use crate::structure::{BlockKind, GqaPolicy};
use serde::{Deserialize, Serialize};

/// The order constraint the greedy removal must respect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupSchedule {
    /// Any remaining group may be removed next.
    Free,
    /// Groups belong to classes (e.g. the KV group of a query head); a level exists only
    /// when every class has lost the same number of groups. `class_of[g]` is group g's
    /// class.
    Balanced {
        /// Class of each group.
        class_of: Vec<u32>,
    },
}

/// The removable units of a block: each group is a set of out-projection input columns
/// (a head = `head_dim` contiguous columns, a KV group = several heads, a neuron = one
/// column).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLayout {
    /// Column indices of each group, ascending within a group, disjoint.
    pub groups: Vec<Vec<usize>>,
    /// Order constraint between groups.
    pub schedule: GroupSchedule,
}

impl GroupLayout {
    /// The standard layout for a block kind: heads (or KV groups, under
    /// [`GqaPolicy::WholeKvGroups`]) for attention, single neurons for FFNs.
    pub fn for_kind(kind: &BlockKind, policy: GqaPolicy) -> GroupLayout {
        match kind {
            BlockKind::Ffn(f) => GroupLayout {
                groups: (0..f.width).map(|j| vec![j]).collect(),
                schedule: GroupSchedule::Free,
            },
            BlockKind::Attention(a) => {
                let head = |h: usize| (h * a.head_dim..(h + 1) * a.head_dim).collect::<Vec<_>>();
                let per_kv = a.heads_per_kv();
                if a.n_kv_heads == a.n_heads || per_kv <= 1 {
                    return GroupLayout {
                        groups: (0..a.n_heads).map(head).collect(),
                        schedule: GroupSchedule::Free,
                    };
                }
                match policy {
                    GqaPolicy::WholeKvGroups => GroupLayout {
                        groups: (0..a.n_kv_heads)
                            .map(|g| (g * per_kv..(g + 1) * per_kv).flat_map(head).collect())
                            .collect(),
                        schedule: GroupSchedule::Free,
                    },
                    GqaPolicy::EqualPerKvGroup => GroupLayout {
                        groups: (0..a.n_heads).map(head).collect(),
                        schedule: GroupSchedule::Balanced {
                            class_of: (0..a.n_heads).map(|h| (h / per_kv) as u32).collect(),
                        },
                    },
                }
            }
        }
    }

    /// Total number of columns covered by the groups.
    pub fn n_columns(&self) -> usize {
        self.groups.iter().map(Vec::len).sum()
    }

    /// Number of groups removed per level step: 1, or the number of classes under a
    /// balanced schedule.
    pub fn step(&self) -> usize {
        match &self.schedule {
            GroupSchedule::Free => 1,
            GroupSchedule::Balanced { class_of } => {
                let mut classes: Vec<u32> = class_of.clone();
                classes.sort_unstable();
                classes.dedup();
                classes.len().max(1)
            }
        }
    }

    /// Checks that groups are non-empty, disjoint, inside `0..n_columns`, and that a
    /// balanced schedule names a class for each group with equal class sizes.
    pub fn validate(&self, n_columns: usize) -> Result<(), String> {
        let mut seen = vec![false; n_columns];
        for (g, cols) in self.groups.iter().enumerate() {
            if cols.is_empty() {
                return Err(format!("group {g} is empty"));
            }
            for &c in cols {
                if c >= n_columns {
                    return Err(format!("group {g} names column {c} of {n_columns}"));
                }
                if std::mem::replace(&mut seen[c], true) {
                    return Err(format!("column {c} is in two groups"));
                }
            }
        }
        if let GroupSchedule::Balanced { class_of } = &self.schedule {
            if class_of.len() != self.groups.len() {
                return Err(format!(
                    "balanced schedule names {} classes for {} groups",
                    class_of.len(),
                    self.groups.len()
                ));
            }
            let mut counts = std::collections::BTreeMap::new();
            for c in class_of {
                *counts.entry(*c).or_insert(0usize) += 1;
            }
            let first = counts.values().next().copied().unwrap_or(0);
            if counts.values().any(|&n| n != first) {
                return Err("balanced schedule has classes of different sizes".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::structure::{AttentionShape, FfnShape};

    #[test]
    fn mha_heads_are_contiguous_columns() {
        let kind = BlockKind::Attention(AttentionShape {
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: 16,
        });
        let l = GroupLayout::for_kind(&kind, GqaPolicy::WholeKvGroups);
        assert_eq!(l.groups.len(), 4);
        assert_eq!(l.groups[2], (32..48).collect::<Vec<_>>());
        assert_eq!(l.schedule, GroupSchedule::Free);
        l.validate(64).unwrap();
    }

    #[test]
    fn gqa_equal_per_group_is_balanced_by_kv_head() {
        let kind = BlockKind::Attention(AttentionShape {
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
        });
        let l = GroupLayout::for_kind(&kind, GqaPolicy::EqualPerKvGroup);
        assert_eq!(l.groups.len(), 9);
        assert_eq!(l.step(), 3);
        assert_eq!(
            l.schedule,
            GroupSchedule::Balanced {
                class_of: vec![0, 0, 0, 1, 1, 1, 2, 2, 2]
            }
        );
        l.validate(576).unwrap();
    }

    #[test]
    fn ffn_neurons_are_single_columns() {
        let l = GroupLayout::for_kind(
            &BlockKind::Ffn(FfnShape {
                width: 8,
                gated: true,
            }),
            GqaPolicy::WholeKvGroups,
        );
        assert_eq!(l.groups.len(), 8);
        assert_eq!(l.n_columns(), 8);
    }

    #[test]
    fn overlapping_groups_are_rejected() {
        let l = GroupLayout {
            groups: vec![vec![0, 1], vec![1]],
            schedule: GroupSchedule::Free,
        };
        assert!(l.validate(2).unwrap_err().contains("two groups"));
    }
}
