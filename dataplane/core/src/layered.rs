//! A map for the routing index: a frozen hash map (the base) under a small persistent overlay
//! of the changes since it was frozen.
//!
//! Lookups are what the data path does per connection: with an empty overlay, one std hash
//! lookup; otherwise one probe of a small tree first. Cloning is O(1) (an `Arc` and the
//! overlay's root), so the next generation of the index costs nothing until it changes, and a
//! change costs one overlay path copy. Once the overlay passes an eighth of the base (at least
//! [`FOLD_MIN`] entries) the next change folds it into a new base, so lookups stay one hash
//! probe plus a shallow tree, and the fold's O(n) copy is paid once per n/8 changes.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

/// Overlay size below which no fold happens, whatever the base.
pub const FOLD_MIN: usize = 1024;

/// The frozen part. foldhash, not std's SipHash: the keys (uids, addresses) come from the
/// control plane, not from peers, so the faster hash is enough; it is still seeded per
/// process.
type Base<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Clone)]
pub struct Layered<K, V> {
    base: Arc<Base<K, V>>,
    /// Changes since the base was frozen: `None` marks a removal.
    overlay: imbl::OrdMap<K, Option<V>>,
    len: usize,
}

impl<K, V> std::fmt::Debug for Layered<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layered")
            .field("len", &self.len)
            .field("overlay", &self.overlay.len())
            .finish_non_exhaustive()
    }
}

impl<K, V> Default for Layered<K, V> {
    fn default() -> Self {
        Layered {
            base: Arc::default(),
            overlay: imbl::OrdMap::new(),
            len: 0,
        }
    }
}

impl<K, V> Layered<K, V>
where
    K: Hash + Eq + Ord + Clone,
    V: Clone,
{
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + Ord + ?Sized,
    {
        if !self.overlay.is_empty() {
            if let Some(entry) = self.overlay.get(key) {
                return entry.as_ref();
            }
        }
        self.base.get(key)
    }

    /// The stored key equal to `key`, and its value (to share the key's allocation).
    pub fn get_key_value<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + Ord + ?Sized,
    {
        if !self.overlay.is_empty() {
            if let Some((k, entry)) = self.overlay.get_key_value(key) {
                return entry.as_ref().map(|v| (k, v));
            }
        }
        self.base.get_key_value(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + Ord + ?Sized,
    {
        self.get(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The base when no other generation shares it and nothing waits in the overlay: a
    /// whole build (and the rest of a delta after a fold) writes it in place.
    fn own_base(&mut self) -> Option<&mut Base<K, V>> {
        if self.overlay.is_empty() {
            Arc::get_mut(&mut self.base)
        } else {
            None
        }
    }

    /// Room for `additional` more entries, when the base is written in place (a build): one
    /// allocation instead of a rehash at every doubling.
    pub fn reserve(&mut self, additional: usize) {
        if let Some(base) = self.own_base() {
            base.reserve(additional);
        }
    }

    /// Changes the value of `key` (starting from `default()` when absent): in place when the
    /// base is written in place, else on a copy that goes into the overlay.
    pub fn update(&mut self, key: K, default: impl FnOnce() -> V, change: impl FnOnce(&mut V)) {
        if let Some(base) = self.own_base() {
            let mut added = false;
            change(base.entry(key).or_insert_with(|| {
                added = true;
                default()
            }));
            if added {
                self.len += 1;
            }
            return;
        }
        let mut value = self.get(&key).cloned().unwrap_or_else(default);
        change(&mut value);
        self.insert(key, value);
    }

    /// Inserts `value` under `key`; returns the value it replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if let Some(base) = self.own_base() {
            let old = base.insert(key, value);
            if old.is_none() {
                self.len += 1;
            }
            return old;
        }
        let old = self.get(&key).cloned();
        if old.is_none() {
            self.len += 1;
        }
        self.overlay.insert(key, Some(value));
        old
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + Ord + ?Sized,
    {
        let old = self.get(key).cloned()?;
        self.len -= 1;
        if let Some(base) = self.own_base() {
            base.remove(key);
            return Some(old);
        }
        match self.base.get_key_value(key) {
            Some((stored, _)) => {
                let stored = stored.clone();
                self.overlay.insert(stored, None);
            }
            None => {
                self.overlay.remove(key);
            }
        }
        Some(old)
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        let from_base = self
            .base
            .iter()
            .filter(|(k, _)| !overridden(&self.overlay, k));
        let from_overlay = self
            .overlay
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)));
        from_base.chain(from_overlay)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// Every value, moved out, when no other map shares this one's base; `None` (the map
    /// simply dropped) when one does.
    pub fn into_values_if_unshared(self) -> Option<Vec<V>> {
        let base = Arc::try_unwrap(self.base).ok()?;
        let overlay = self.overlay;
        let mut values: Vec<V> = base
            .into_iter()
            .filter(|(k, _)| !overridden(&overlay, k))
            .map(|(_, v)| v)
            .collect();
        values.extend(overlay.into_iter().filter_map(|(_, v)| v));
        Some(values)
    }

    /// Folds the overlay into a new base once it has grown past an eighth of the base.
    pub fn fold_if_large(&mut self) {
        if self.overlay.len() > FOLD_MIN.max(self.base.len() / 8) {
            self.fold();
        }
    }

    /// Folds the overlay into a new base now (a whole build ends with this).
    pub fn fold(&mut self) {
        if self.overlay.is_empty() {
            return;
        }
        let base = Arc::make_mut(&mut self.base);
        for (k, v) in std::mem::take(&mut self.overlay) {
            match v {
                Some(v) => {
                    base.insert(k, v);
                }
                None => {
                    base.remove(&k);
                }
            }
        }
    }

    /// Entries waiting in the overlay (for tests and benchmarks).
    pub fn overlay_len(&self) -> usize {
        self.overlay.len()
    }
}

/// A base entry the overlay has changed or removed since the base was frozen.
fn overridden<K: Ord + Clone, V: Clone>(overlay: &imbl::OrdMap<K, Option<V>>, key: &K) -> bool {
    !overlay.is_empty() && overlay.contains_key(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_see_the_overlay_over_the_base_and_folding_changes_nothing_visible() {
        let mut m: Layered<u32, &str> = Layered::default();
        m.insert(1, "one");
        m.insert(2, "two");
        m.fold();
        let frozen = m.clone();
        m.insert(2, "deux");
        m.insert(3, "three");
        assert_eq!(m.remove(&1), Some("one"));
        assert_eq!(m.remove(&9), None);
        assert_eq!(
            (m.get(&1), m.get(&2), m.get(&3)),
            (None, Some(&"deux"), Some(&"three"))
        );
        assert_eq!(m.len(), 2);
        // The earlier generation is untouched.
        assert_eq!(
            (frozen.get(&1), frozen.get(&2), frozen.len()),
            (Some(&"one"), Some(&"two"), 2)
        );
        let mut all: Vec<_> = m.iter().map(|(k, v)| (*k, *v)).collect();
        all.sort();
        assert_eq!(all, [(2, "deux"), (3, "three")]);
        m.fold();
        assert_eq!(m.overlay_len(), 0);
        let mut folded: Vec<_> = m.iter().map(|(k, v)| (*k, *v)).collect();
        folded.sort();
        assert_eq!(folded, all);
        assert_eq!(frozen.get(&1), Some(&"one"), "folding copies a shared base");
    }

    #[test]
    fn an_added_then_removed_key_leaves_no_trace_and_the_overlay_folds_when_large() {
        let mut m: Layered<u32, u32> = Layered::default();
        for i in 0..100 {
            m.insert(i, i);
        }
        m.fold();
        m.insert(500, 5);
        assert_eq!(m.remove(&500), Some(5));
        assert_eq!((m.len(), m.overlay_len()), (100, 0));
        for i in 0..=FOLD_MIN as u32 {
            m.insert(1000 + i, i);
            m.fold_if_large();
        }
        assert!(m.overlay_len() < FOLD_MIN, "folded once past the minimum");
        assert_eq!(m.len(), 100 + FOLD_MIN + 1);
        assert_eq!(m.get(&(1000 + FOLD_MIN as u32)), Some(&(FOLD_MIN as u32)));
    }

    #[test]
    fn update_changes_in_place_when_unshared_and_never_what_another_generation_sees() {
        let mut m: Layered<u32, Vec<u32>> = Layered::default();
        m.update(1, Vec::new, |v| v.push(10));
        m.update(1, Vec::new, |v| v.push(11));
        assert_eq!(
            (m.get(&1), m.len(), m.overlay_len()),
            (Some(&vec![10, 11]), 1, 0)
        );
        let frozen = m.clone();
        m.update(1, Vec::new, |v| v.push(12));
        m.update(2, Vec::new, |v| v.push(20));
        assert_eq!(m.get(&1), Some(&vec![10, 11, 12]));
        assert_eq!(m.get(&2), Some(&vec![20]));
        assert_eq!(m.len(), 2);
        assert_eq!(
            frozen.get(&1),
            Some(&vec![10, 11]),
            "the shared base is untouched"
        );
        assert_eq!(frozen.get(&2), None);
    }

    #[test]
    fn values_move_out_only_of_a_map_whose_base_no_generation_shares() {
        let mut m: Layered<u32, u32> = Layered::default();
        m.insert(1, 10);
        m.insert(2, 20);
        m.fold();
        m.insert(2, 21);
        m.insert(3, 30);
        let next = m.clone();
        assert_eq!(m.into_values_if_unshared(), None);
        let mut values = next.into_values_if_unshared().expect("unshared now");
        values.sort();
        assert_eq!(values, vec![10, 21, 30], "the overlay's value wins, once");
    }
}
