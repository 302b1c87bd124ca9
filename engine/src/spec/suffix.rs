//! The suffix proposer (vLLM's `suffix` method, after Snowflake's Arctic
//! Inference "SuffixDecoding"): the continuation that most often followed the
//! sequence's last few tokens, in its own prompt and output and in the
//! outputs of the requests this engine served before it.
//!
//! Where the n-gram proposer copies one earlier occurrence, this one counts
//! them all: every window of at most `depth` tokens of the texts it holds is
//! a path in a counting trie, so a path's count is how often those tokens
//! occurred. For each suffix of the sequence that occurs (shortest first; a
//! suffix that is absent has no longer one present), it walks from that
//! suffix's node to the most frequent child while the product of the
//! children's shares (the estimated chance that the whole draft is right)
//! stays at least `min_token_prob`, for at most `spec_factor` times the
//! suffix's length tokens (a longer match earns a longer draft). The draft with the
//! highest score (the sum of those chances: the expected number of accepted
//! tokens) wins. Agentic and templated traffic, where many requests produce
//! nearly the same output (the same JSON shape, the same tool calls, the same
//! boilerplate), is what the cache of earlier outputs is for; the request's
//! own prompt and output cover editing and copying, as the n-gram proposer
//! does.
//!
//! Two stores, one walk:
//! - [`SuffixCache`] holds earlier outputs (and the running ones, token by
//!   token, so that concurrent requests of one template help each other) in a
//!   `Trie`, bounded by a request count (vLLM's
//!   `suffix_decoding_max_cached_requests`, oldest evicted first) and by
//!   [`MAX_NODES`].
//! - The sequence's own tokens are not kept in a trie (a long prompt would cost
//!   `depth` nodes a token, per sequence); [`local_draft`] scans them for the
//!   earlier occurrences of the suffix instead, which gives the same counts.
//!
//! Sans-IO and model-free, like the rest of `spec`: the engine feeds it the
//! tokens its sequences make and asks it for drafts.

use rustc_hash::FxHashMap;
use std::collections::VecDeque;

/// Most trie nodes kept for earlier outputs: at 28 bytes a node plus about
/// 20 for its child-map entry, about 200 MB. An output of `n` tokens adds at
/// most `n * depth` nodes (past the first few tokens of a window most are
/// new, unless outputs repeat), so at depth 24 this holds about a thousand
/// outputs of 200 tokens that share nothing; past it the oldest are evicted
/// even below `max_cached_requests`. (Arctic Inference's compressed suffix
/// tree stores O(n) nodes an output; this trie is the simpler structure,
/// and what bounds it is said here.)
pub const MAX_NODES: usize = 4 << 20;

/// The suffix proposer's settings (vLLM's `suffix_decoding_*` fields).
#[derive(Clone, Debug, PartialEq)]
pub struct SuffixParams {
    /// Longest window counted, suffix and draft together (`suffix_decoding_max_tree_depth`).
    pub max_tree_depth: usize,
    /// Finished outputs kept for later requests; 0: only the request's own
    /// tokens are used (`suffix_decoding_max_cached_requests`).
    pub max_cached_requests: usize,
    /// A suffix of `m` matched tokens may propose at most `m * max_spec_factor`
    /// (`suffix_decoding_max_spec_factor`).
    pub max_spec_factor: f32,
    /// A draft stops before its estimated chance of being right falls below
    /// this (`suffix_decoding_min_token_prob`).
    pub min_token_prob: f32,
}

impl Default for SuffixParams {
    /// vLLM's defaults.
    fn default() -> Self {
        SuffixParams { max_tree_depth: 24, max_cached_requests: 10_000, max_spec_factor: 1.0, min_token_prob: 0.1 }
    }
}

/// A proposal and how many of its tokens are expected to be accepted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Draft {
    /// The proposed tokens, in order.
    pub tokens: Vec<u32>,
    /// Per token, the estimated chance that it and every token before it
    /// are right (falling; each at least `min_token_prob`).
    pub chances: Vec<f32>,
}

impl Draft {
    /// The sum of `chances`: the expected number of accepted tokens.
    pub fn score(&self) -> f32 {
        self.chances.iter().sum()
    }

    /// Appends `token`, whose chance (with every token before it) is `chance`.
    fn push(&mut self, token: u32, chance: f32) {
        self.tokens.push(token);
        self.chances.push(chance);
    }

    /// The better of two drafts: the higher score, `self` on a tie.
    fn or_better(self, other: Draft) -> Draft {
        if other.score() > self.score() {
            other
        } else {
            self
        }
    }
}

const NIL: u32 = u32::MAX;
const ROOT: u32 = 0;

/// One trie node: how many windows pass through it, its place among its
/// parent's children (a doubly linked list, for walking them and for O(1)
/// removal; finding a child by token goes through the map), and its most
/// frequent child, kept up to date so that a draft's step costs O(1) however
/// many children a node has (a common token can have thousands).
#[derive(Clone, Copy)]
struct Node {
    count: u32,
    token: u32,
    parent: u32,
    first_child: u32,
    prev: u32,
    next: u32,
    /// The child with the highest count (NIL: none; not kept for the root,
    /// where no draft starts).
    best: u32,
}

/// A counting trie of token windows.
struct Trie {
    nodes: Vec<Node>,
    free: Vec<u32>,
    /// (parent, token) -> child.
    children: FxHashMap<u64, u32>,
}

fn key(parent: u32, token: u32) -> u64 {
    (u64::from(parent) << 32) | u64::from(token)
}

impl Trie {
    fn new() -> Trie {
        let root = Node { count: 0, token: NIL, parent: NIL, first_child: NIL, prev: NIL, next: NIL, best: NIL };
        Trie { nodes: vec![root], free: Vec::new(), children: FxHashMap::default() }
    }

    fn len(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    fn child(&self, parent: u32, token: u32) -> Option<u32> {
        self.children.get(&key(parent, token)).copied()
    }

    /// The node of `path` under `from`, if every step of it exists.
    fn walk(&self, from: u32, path: &[u32]) -> Option<u32> {
        path.iter().try_fold(from, |n, &t| self.child(n, t))
    }

    /// Counts one more window through `parent`'s child `token`, making it if new.
    fn bump_child(&mut self, parent: u32, token: u32) -> u32 {
        let id = match self.child(parent, token) {
            Some(id) => id,
            None => {
                let first = self.nodes[parent as usize].first_child;
                let node = Node { count: 0, token, parent, first_child: NIL, prev: NIL, next: first, best: NIL };
                let id = match self.free.pop() {
                    Some(id) => {
                        self.nodes[id as usize] = node;
                        id
                    }
                    None => {
                        self.nodes.push(node);
                        (self.nodes.len() - 1) as u32
                    }
                };
                if first != NIL {
                    self.nodes[first as usize].prev = id;
                }
                self.nodes[parent as usize].first_child = id;
                self.children.insert(key(parent, token), id);
                id
            }
        };
        self.nodes[id as usize].count += 1;
        // The first child to reach a count keeps the place among equals.
        if parent != ROOT {
            let best = self.nodes[parent as usize].best;
            if best == NIL || self.nodes[id as usize].count > self.nodes[best as usize].count {
                self.nodes[parent as usize].best = id;
            }
        }
        id
    }

    /// Uncounts one window through `id`, removing the node at 0 (its children
    /// are gone by then: a child never counts more than its parent, and a
    /// window's path is uncounted deepest first).
    fn drop_one(&mut self, id: u32) {
        let n = &mut self.nodes[id as usize];
        n.count -= 1;
        let Node { count, token, parent, prev, next, .. } = *n;
        if count == 0 {
            debug_assert_eq!(n.first_child, NIL);
            if prev == NIL {
                self.nodes[parent as usize].first_child = next;
            } else {
                self.nodes[prev as usize].next = next;
            }
            if next != NIL {
                self.nodes[next as usize].prev = prev;
            }
            self.children.remove(&key(parent, token));
            self.free.push(id);
        }
        if parent != ROOT && self.nodes[parent as usize].best == id {
            self.nodes[parent as usize].best = self.scan_best(parent);
        }
    }

    /// The most frequent child of `n` by walking them all (the oldest among
    /// equals): after an eviction lowered the one that was.
    fn scan_best(&self, n: u32) -> u32 {
        let mut c = self.nodes[n as usize].first_child;
        let mut best = NIL;
        while c != NIL {
            // The list is newest first: `>=` keeps the oldest among equals.
            if best == NIL || self.nodes[c as usize].count >= self.nodes[best as usize].count {
                best = c;
            }
            c = self.nodes[c as usize].next;
        }
        best
    }

    /// Counts every window of at most `depth` tokens of `text`.
    #[cfg(test)]
    fn insert(&mut self, text: &[u32], depth: usize) {
        let mut frontier = Vec::new();
        for &t in text {
            advance(self, &mut frontier, t, depth);
        }
    }

    /// Uncounts every window of at most `depth` tokens of `text` (which was inserted).
    fn remove(&mut self, text: &[u32], depth: usize) {
        let mut path = Vec::with_capacity(depth);
        for s in 0..text.len() {
            path.clear();
            let mut n = ROOT;
            for &t in &text[s..(s + depth).min(text.len())] {
                match self.child(n, t) {
                    Some(c) => {
                        path.push(c);
                        n = c;
                    }
                    None => break,
                }
            }
            for &n in path.iter().rev() {
                self.drop_one(n);
            }
        }
    }

    /// The most frequent child of `n` and its count.
    fn top_child(&self, n: u32) -> Option<(u32, u32)> {
        let best = self.nodes[n as usize].best;
        (best != NIL).then(|| (best, self.nodes[best as usize].count))
    }

    /// The greedy draft below `n`: at most `limit` tokens, stopping where
    /// the chance of the whole draft falls below `min_prob`.
    fn greedy(&self, mut n: u32, limit: usize, min_prob: f32) -> Draft {
        let mut d = Draft::default();
        let mut prob = 1.0f32;
        while d.tokens.len() < limit {
            let Some((c, count)) = self.top_child(n) else { break };
            prob *= count as f32 / self.nodes[n as usize].count as f32;
            if prob < min_prob {
                break;
            }
            d.push(self.nodes[c as usize].token, prob);
            n = c;
        }
        d
    }
}

/// Appends `t` to a text whose window-ending nodes are `frontier` (depth 1,
/// 2, ...): counts each window ending at `t` and makes their nodes the frontier.
fn advance(trie: &mut Trie, frontier: &mut Vec<u32>, t: u32, depth: usize) {
    if depth == 0 {
        return;
    }
    frontier.truncate(depth - 1);
    // Deepest first, so each parent is read before it is replaced.
    for i in (0..frontier.len()).rev() {
        let c = trie.bump_child(frontier[i], t);
        if i + 1 == frontier.len() {
            frontier.push(c);
        } else {
            frontier[i + 1] = c;
        }
    }
    let c = trie.bump_child(ROOT, t);
    if frontier.is_empty() {
        frontier.push(c);
    } else {
        frontier[0] = c;
    }
}

/// How many tokens a suffix of `matched` tokens may propose.
fn limit(matched: usize, factor: f32, max_tokens: usize) -> usize {
    ((matched as f32 * factor + 1e-6) as usize).min(max_tokens)
}

/// A running sequence's output so far and the nodes its last windows end at.
struct Active {
    output: Vec<u32>,
    frontier: Vec<u32>,
}

/// Earlier and running outputs, for drafts (one per engine).
pub struct SuffixCache {
    params: SuffixParams,
    trie: Trie,
    active: FxHashMap<u64, Active>,
    /// Finished outputs still counted, oldest first.
    finished: VecDeque<Vec<u32>>,
}

impl SuffixCache {
    /// An empty cache.
    pub fn new(params: SuffixParams) -> SuffixCache {
        SuffixCache { params, trie: Trie::new(), active: FxHashMap::default(), finished: VecDeque::new() }
    }

    /// Counts tokens that sequence `seq` made.
    pub fn extend(&mut self, seq: u64, tokens: &[u32]) {
        if self.params.max_cached_requests == 0 {
            return;
        }
        let depth = self.params.max_tree_depth;
        let a = self.active.entry(seq).or_insert_with(|| Active { output: Vec::new(), frontier: Vec::new() });
        for &t in tokens {
            advance(&mut self.trie, &mut a.frontier, t, depth);
        }
        a.output.extend_from_slice(tokens);
        self.evict();
    }

    /// Sequence `seq` ended: its output stays counted for later requests.
    pub fn finish(&mut self, seq: u64) {
        if let Some(a) = self.active.remove(&seq) {
            if !a.output.is_empty() {
                self.finished.push_back(a.output);
            }
            self.evict();
        }
    }

    /// Evicts the oldest finished outputs while more than
    /// `max_cached_requests` are kept or the trie is over [`MAX_NODES`].
    fn evict(&mut self) {
        let keep = self.params.max_cached_requests;
        while self.finished.len() > keep || (self.trie.len() > MAX_NODES && !self.finished.is_empty()) {
            if let Some(old) = self.finished.pop_front() {
                self.trie.remove(&old, self.params.max_tree_depth);
            }
        }
    }

    /// The best draft of at most `max_tokens` to follow `tokens` (a
    /// sequence's prompt and output so far), from its own tokens and from
    /// the cached outputs. Empty where no suffix of it occurs in either.
    pub fn propose(&self, tokens: &[u32], max_tokens: usize) -> Draft {
        let p = &self.params;
        let local = local_draft(tokens, p, max_tokens);
        let pattern = &tokens[tokens.len().saturating_sub(p.max_tree_depth)..];
        let mut global = Draft::default();
        for m in 1..=pattern.len() {
            let Some(n) = self.trie.walk(ROOT, &pattern[pattern.len() - m..]) else { break };
            global = global.or_better(self.trie.greedy(n, limit(m, p.max_spec_factor, max_tokens), p.min_token_prob));
        }
        // Earlier outputs first on a tie: they are what the model wrote,
        // where the prompt is only what it was given.
        global.or_better(local)
    }

    /// Trie nodes in use (for tests and the limit).
    pub fn nodes(&self) -> usize {
        self.trie.len()
    }
}

/// Most earlier occurrences of the sequence's last token that [`local_draft`]
/// counts, the latest first: bounds its work per step (a prompt of one token
/// repeated 100k times would otherwise cost millions of steps per draft,
/// every step, for every request in the batch), and nearby text is the better
/// guide anyway.
const MAX_LOCAL_OCCURRENCES: usize = 256;

/// The draft from `tokens`' own earlier occurrences of its suffixes, as a
/// trie of `tokens`' windows would give it: for a suffix `P` of `m` tokens,
/// the occurrences of `P` (the sequence's end among them) are the node's
/// count, and the tokens after each its children. Only the latest
/// `MAX_LOCAL_OCCURRENCES` occurrences of the last token are counted.
pub fn local_draft(tokens: &[u32], p: &SuffixParams, max_tokens: usize) -> Draft {
    let len = tokens.len();
    let depth = p.max_tree_depth;
    if len < 2 || depth < 2 || max_tokens == 0 {
        return Draft::default();
    }
    // For each earlier end e (tokens[..e]), how many of its last tokens equal
    // the sequence's last ones (at most depth - 1: a window holds the suffix
    // and at least one token after it); the latest MAX_LOCAL_OCCURRENCES only.
    let (ends, matched): (Vec<usize>, Vec<usize>) = (1..len)
        .rev()
        .filter_map(|e| {
            let m = (0..(depth - 1).min(e)).take_while(|&i| tokens[e - 1 - i] == tokens[len - 1 - i]).count();
            (m > 0).then_some((e, m))
        })
        .take(MAX_LOCAL_OCCURRENCES)
        .unzip();
    let longest = matched.iter().copied().max().unwrap_or(0);
    let mut best = Draft::default();
    let mut live = Vec::new();
    let mut counts: Vec<(u32, u32, usize)> = Vec::new();
    for m in 1..=longest {
        // Ends of P's occurrences, the sequence's own end counted (no continuation).
        live.clear();
        live.extend(ends.iter().zip(&matched).filter(|&(_, &l)| l >= m).map(|(&e, _)| e));
        let mut node_count = live.len() + 1;
        let mut d = Draft::default();
        let mut prob = 1.0f32;
        let cap = limit(m, p.max_spec_factor, max_tokens).min(depth - m);
        while d.tokens.len() < cap {
            let j = d.tokens.len();
            // Children: the token after each live occurrence, counted, with
            // the latest occurrence to break ties (nearby text is the better guide).
            counts.clear();
            for &e in &live {
                if let Some(&t) = tokens.get(e + j).filter(|_| e + j < len) {
                    match counts.iter_mut().find(|(c, _, _)| *c == t) {
                        Some(c) => {
                            c.1 += 1;
                            c.2 = c.2.max(e);
                        }
                        None => counts.push((t, 1, e)),
                    }
                }
            }
            let Some(&(t, count, _)) = counts.iter().max_by_key(|&&(_, n, last)| (n, last)) else { break };
            prob *= count as f32 / node_count as f32;
            if prob < p.min_token_prob {
                break;
            }
            d.push(t, prob);
            live.retain(|&e| e + j < len && tokens[e + j] == t);
            // The next node's count: occurrences of P + draft, one ending at
            // the sequence's end included.
            node_count = live.len();
        }
        best = best.or_better(d);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(depth: usize) -> SuffixParams {
        SuffixParams { max_tree_depth: depth, max_cached_requests: 100, max_spec_factor: 1.0, min_token_prob: 0.1 }
    }

    /// Every window of at most `depth` tokens and how often it occurs, counted naively.
    fn windows(texts: &[&[u32]], depth: usize) -> std::collections::BTreeMap<Vec<u32>, u32> {
        let mut m = std::collections::BTreeMap::new();
        for t in texts {
            for s in 0..t.len() {
                for e in s + 1..=(s + depth).min(t.len()) {
                    *m.entry(t[s..e].to_vec()).or_insert(0) += 1;
                }
            }
        }
        m
    }

    /// The trie's windows and counts; checks each node's `best` on the way.
    fn trie_windows(trie: &Trie) -> std::collections::BTreeMap<Vec<u32>, u32> {
        let mut m = std::collections::BTreeMap::new();
        let mut stack = vec![(ROOT, Vec::new())];
        while let Some((n, path)) = stack.pop() {
            if n != ROOT {
                let top = trie.top_child(n).map(|(_, count)| count);
                assert_eq!(top, (trie.scan_best(n) != NIL).then(|| trie.nodes[trie.scan_best(n) as usize].count), "{path:?}");
            }
            let mut c = trie.nodes[n as usize].first_child;
            while c != NIL {
                let mut p = path.clone();
                p.push(trie.nodes[c as usize].token);
                m.insert(p.clone(), trie.nodes[c as usize].count);
                stack.push((c, p));
                c = trie.nodes[c as usize].next;
            }
        }
        m
    }

    #[test]
    fn counts_every_window_and_forgets_them() {
        let a: &[u32] = &[1, 2, 3, 1, 2, 4, 1, 2, 3];
        let b: &[u32] = &[2, 3, 5, 2, 3];
        let mut trie = Trie::new();
        trie.insert(a, 4);
        trie.insert(b, 4);
        assert_eq!(trie_windows(&trie), windows(&[a, b], 4));
        trie.remove(a, 4);
        assert_eq!(trie_windows(&trie), windows(&[b], 4));
        trie.remove(b, 4);
        assert_eq!(trie.len(), 1, "only the root is left");
        assert!(trie.children.is_empty());
        // Freed nodes are reused.
        trie.insert(a, 4);
        assert_eq!(trie_windows(&trie), windows(&[a], 4));
        assert!(trie.nodes.len() <= windows(&[a, b], 4).len() + 1);
    }

    #[test]
    fn cached_outputs_propose_their_most_frequent_continuation() {
        let mut c = SuffixCache::new(params(8));
        // Three earlier outputs: after [7, 8] came 9 10 11 twice and 9 12 once.
        for (seq, out) in [(1, vec![7, 8, 9, 10, 11]), (2, vec![5, 7, 8, 9, 10, 11]), (3, vec![7, 8, 9, 12])] {
            c.extend(seq, &out[..2]);
            c.extend(seq, &out[2..]);
            c.finish(seq);
        }
        // A new sequence ending in 7 8: its own tokens do not help.
        let d = c.propose(&[40, 41, 7, 8], 8);
        // m = 2 ([7, 8]) allows 2 tokens: 9 (3/3), then 10 (2/3).
        assert_eq!(d.tokens, vec![9, 10]);
        assert!((d.score() - (1.0 + 2.0 / 3.0)).abs() < 1e-6, "{}", d.score());
        // A longer match earns a longer draft.
        let d = c.propose(&[40, 5, 7, 8], 8);
        assert_eq!(d.tokens, vec![9, 10, 11]);
        // Nothing matches: nothing proposed.
        assert!(c.propose(&[40, 41, 42], 8).tokens.is_empty());
        // max_tokens bounds it.
        assert_eq!(c.propose(&[40, 5, 7, 8], 1).tokens, vec![9]);
    }

    #[test]
    fn oldest_outputs_are_evicted_first() {
        let mut c = SuffixCache::new(SuffixParams { max_cached_requests: 2, ..params(6) });
        for seq in 0..3u64 {
            let base = 100 * seq as u32;
            c.extend(seq, &[base, base + 1, base + 2, base + 3]);
            c.finish(seq);
        }
        assert!(c.propose(&[0, 1], 4).tokens.is_empty(), "the first output was evicted");
        assert_eq!(c.propose(&[200, 201], 4).tokens, vec![202, 203]);
        let mut texts: Vec<&[u32]> = Vec::new();
        let kept: Vec<Vec<u32>> = c.finished.iter().cloned().collect();
        texts.extend(kept.iter().map(Vec::as_slice));
        assert_eq!(trie_windows(&c.trie), windows(&texts, 6));
        // With no cache, only the sequence's own tokens are used.
        let mut none = SuffixCache::new(SuffixParams { max_cached_requests: 0, ..params(6) });
        none.extend(1, &[1, 2, 3]);
        none.finish(1);
        assert_eq!(none.nodes(), 1);
    }

    #[test]
    fn running_outputs_help_each_other() {
        let mut c = SuffixCache::new(params(8));
        c.extend(1, &[3, 4, 5, 6]);
        // Sequence 2 has not finished, yet sequence 1 sees its tokens too.
        assert_eq!(c.propose(&[9, 3, 4], 4).tokens, vec![5, 6]);
    }

    #[test]
    fn local_drafts_match_a_trie_of_the_sequence() {
        // The local scan must give what a trie of the sequence's own windows gives.
        let seqs: Vec<Vec<u32>> = vec![
            vec![1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4, 9, 1, 2],
            vec![7, 7, 7, 7, 7],
            vec![1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3],
            (0..200).map(|i| (i * 7 % 13) as u32).collect(),
        ];
        for t in &seqs {
            for depth in [3, 5, 8] {
                for max in [1, 3, 8] {
                    let p = params(depth);
                    let mut trie = Trie::new();
                    trie.insert(t, depth);
                    let mut want = Draft::default();
                    let pattern = &t[t.len().saturating_sub(depth)..];
                    for m in 1..=pattern.len() {
                        let Some(n) = trie.walk(ROOT, &pattern[pattern.len() - m..]) else { break };
                        want = want.or_better(trie.greedy(n, limit(m, 1.0, max), p.min_token_prob));
                    }
                    let got = local_draft(t, &p, max);
                    assert_eq!(got.tokens.len(), want.tokens.len(), "{t:?} depth {depth} max {max}");
                    assert!((got.score() - want.score()).abs() < 1e-5, "{t:?} depth {depth}: {got:?} vs {want:?}");
                }
            }
        }
        // A long run of one token: bounded work, and more of the run proposed.
        let run = vec![7u32; 100_000];
        assert_eq!(local_draft(&run, &params(24), 8).tokens, vec![7; 8]);
        // A copy continues the copied text.
        let t = [10, 11, 12, 13, 14, 15, 16, 0, 10, 11, 12];
        assert_eq!(local_draft(&t, &params(24), 8).tokens, vec![13, 14, 15]);
    }
}
