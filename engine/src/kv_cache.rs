//! Paged KV block manager with prefix caching, modelled on vLLM v1's
//! `KVCacheManager` + `BlockPool` (one KV cache group, full attention only).
//!
//! Sans-IO: this module only does bookkeeping of block ids. The model's KV
//! tensors are laid out as `num_blocks` blocks of `block_size` token slots;
//! position `p` of a sequence lives in block `table[p / block_size]`, slot
//! `p % block_size`.
//!
//! Prefix caching: a block is *registered* once it is full and every token in
//! it is covered by computation that has been scheduled. Its cache key chains
//! the parent block's key with the block's token ids, so a hit on block `i`
//! implies the whole prefix `0..=i` is identical. Look-ups are exact: the
//! 64-bit chained hash only picks a bucket; inside it an entry matches only if
//! its token ids are equal and its parent is the very cache entry matched for
//! the previous block (entries get ids that are never reused), so no hash
//! collision can ever serve KV computed for other tokens.
//!
//! Free blocks sit in a free queue that doubles as the eviction order: cached
//! blocks freed by a sequence go to the tail (least recently freed is evicted
//! first), blocks holding nothing reusable go to the head (reused first, as
//! newer vLLM does). A cached block whose ref count drops to 0 stays cached
//! (and can be hit) until it is popped for reuse.
//!
//! KV events: with prefix caching on, the manager logs how the multiset of
//! registered blocks changes (`Stored` on registration, `Removed` on
//! eviction, `Cleared` and a snapshot on a reset), named by chained hash, so
//! the engine can tell gateways which prompt prefixes this rank holds.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use ferry_transport::{KvEvent, MAX_KV_EVENTS};

/// vLLM's default number of token slots per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Parent hash of a sequence's first block: a fixed seed so hashes are
/// reproducible across runs and processes.
pub const ROOT_HASH: u64 = 0x6a09_e667_f3bc_c908;

/// Parent entry id of a sequence's first block. Real entries start at 1.
const ROOT_ENTRY: u64 = 0;

/// "No block" marker in the free-queue links.
const NIL: u32 = u32::MAX;

/// Chained block hash: FNV-1a over the parent hash and the token ids, then a
/// splitmix64 finalizer so that nearby inputs spread over the whole range.
/// Own implementation (not std's `DefaultHasher`, whose output may change
/// between Rust releases) so values are stable.
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    };
    eat(&parent.to_le_bytes());
    eat(&(tokens.len() as u64).to_le_bytes());
    for t in tokens {
        eat(&t.to_le_bytes());
    }
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The chained hashes of `tokens`' full blocks, in order: the names this
/// cache gives them (and reports in its KV events), which a gateway computes
/// over a prompt to route it to the rank that holds most of it.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut parent = ROOT_HASH;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            parent = chain_hash(parent, chunk);
            parent
        })
        .collect()
}

/// Most events a [`KvEventQueue`] of a cache of `num_blocks` blocks holds
/// before it is folded into `Cleared` and a snapshot. At least twice the
/// largest snapshot, so a fold is followed by at least `num_blocks` pushes
/// before the next one: folding stays amortized O(1) per event.
pub fn kv_event_cap(num_blocks: usize) -> usize {
    (4 * MAX_KV_EVENTS).max(num_blocks.saturating_mul(2))
}

/// Prefix-cache events not yet handed on, oldest first. Replaying them on top
/// of what was handed on before gives the current multiset of blocks. A
/// `Cleared` makes everything queued before it moot, so pushing one drops
/// them; the owner keeps the queue bounded by folding it into a snapshot
/// ([`Self::reset_to`]) once it passes its cap.
#[derive(Clone, Debug, Default)]
pub struct KvEventQueue {
    /// A deque: a snapshot of a large cache leaves in many batches, each
    /// taken off the front.
    events: VecDeque<KvEvent>,
}

impl KvEventQueue {
    /// Queues one event; a `Cleared` first drops everything queued before it.
    pub fn push(&mut self, event: KvEvent) {
        if event == KvEvent::Cleared {
            self.events.clear();
        }
        self.events.push_back(event);
    }

    /// [`Self::push`]es each event in order.
    pub fn extend(&mut self, events: impl IntoIterator<Item = KvEvent>) {
        for e in events {
            self.push(e);
        }
    }

    /// Replaces the queue with `Cleared` and one `Stored` per held block:
    /// the same end state in at most `held.len() + 1` events.
    pub fn reset_to(&mut self, held: &[u64]) {
        self.events.clear();
        self.events.reserve(held.len() + 1);
        self.events.push_back(KvEvent::Cleared);
        self.events.extend(held.iter().map(|&h| KvEvent::Stored(h)));
    }

    /// Takes the oldest `max` events (all of them if fewer).
    pub fn take(&mut self, max: usize) -> Vec<KvEvent> {
        let n = max.min(self.events.len());
        self.events.drain(..n).collect()
    }

    /// Events queued (what the owner compares with its cap).
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Nothing to hand on.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// Why `allocate_slots` did not allocate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvError {
    /// Not enough free blocks right now; the scheduler may preempt and retry.
    OutOfBlocks {
        /// New blocks the allocation needs, beyond those the sequence holds
        /// and its prefix hits.
        needed: usize,
        /// Free blocks it could have had (cached ones nobody holds included,
        /// its own prefix hits not).
        free: usize,
    },
    /// The call does not fit the manager's state (a caller bug); nothing changed.
    Invalid(String),
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::OutOfBlocks { needed, free } => {
                write!(f, "KV cache full: need {needed} blocks, {free} free")
            }
            KvError::Invalid(msg) => write!(f, "invalid KV allocation: {msg}"),
        }
    }
}

impl std::error::Error for KvError {}

/// Result of a prefix-cache look-up: the cached blocks covering the first
/// `num_tokens` tokens (always whole blocks). No references are taken until
/// it is passed to [`KvCacheManager::allocate_slots`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CachedPrefix {
    /// The hit blocks, one per block of the prefix, in order.
    pub blocks: Vec<u32>,
    /// Tokens they cover: `blocks.len() * block_size`. Never the whole
    /// prompt: its last token is always computed, to give logits to sample from.
    pub num_tokens: usize,
}

/// Identity of a registered block: its bucket (chained hash) and entry id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CacheTag {
    hash: u64,
    entry: u64,
}

#[derive(Clone, Debug)]
struct Block {
    ref_cnt: u32,
    tag: Option<CacheTag>,
}

/// One distinct cached block content: the tokens and the parent entry. Several
/// physical blocks may hold the same content (two sequences computed it at the
/// same time); any of them serves a hit.
#[derive(Clone, Debug)]
struct Entry {
    id: u64,
    parent: u64,
    tokens: Box<[u32]>,
    blocks: Vec<u32>,
}

/// Doubly linked list over block ids (O(1) push at either end, pop front and
/// removal from the middle), like vLLM's `FreeKVCacheBlockQueue`.
#[derive(Clone, Debug)]
struct FreeQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    linked: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeQueue {
    /// All blocks free, in id order (the first allocation gets block 0).
    fn new_full(n: usize) -> FreeQueue {
        let mut q = FreeQueue {
            prev: vec![NIL; n],
            next: vec![NIL; n],
            linked: vec![false; n],
            head: NIL,
            tail: NIL,
            len: 0,
        };
        for b in 0..n as u32 {
            q.push_back(b);
        }
        q
    }

    fn contains(&self, b: u32) -> bool {
        self.linked[b as usize]
    }

    fn push_back(&mut self, b: u32) {
        debug_assert!(!self.linked[b as usize]);
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.linked[b as usize] = true;
        self.len += 1;
    }

    fn push_front(&mut self, b: u32) {
        debug_assert!(!self.linked[b as usize]);
        self.next[b as usize] = self.head;
        self.prev[b as usize] = NIL;
        if self.head == NIL {
            self.tail = b;
        } else {
            self.prev[self.head as usize] = b;
        }
        self.head = b;
        self.linked[b as usize] = true;
        self.len += 1;
    }

    fn remove(&mut self, b: u32) {
        if !self.linked[b as usize] {
            return;
        }
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.linked[b as usize] = false;
        self.len -= 1;
    }

    fn pop_front(&mut self) -> Option<u32> {
        let b = self.head;
        if b == NIL {
            return None;
        }
        self.remove(b);
        Some(b)
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let b = cur;
            cur = self.next[b as usize];
            Some(b)
        })
    }
}

/// A sequence's blocks: `blocks[..num_cached]` are registered in the prefix
/// cache (hit or computed), the rest are not (yet).
#[derive(Clone, Debug, Default)]
struct SeqBlocks {
    blocks: Vec<u32>,
    num_cached: usize,
}

/// The paged KV block manager.
#[derive(Clone, Debug)]
pub struct KvCacheManager {
    block_size: usize,
    enable_caching: bool,
    blocks: Vec<Block>,
    free: FreeQueue,
    /// Chained hash -> entries in that bucket (almost always one).
    cache: HashMap<u64, Vec<Entry>>,
    next_entry_id: u64,
    seqs: HashMap<u64, SeqBlocks>,
    hash_fn: fn(u64, &[u32]) -> u64,
    queries: u64,
    hits: u64,
    preempted_queries: u64,
    preempted_hits: u64,
    /// Registrations and evictions not yet taken (`take_kv_events`); only
    /// with prefix caching on.
    kv_events: KvEventQueue,
    /// Events `kv_events` may hold before it is folded into a snapshot.
    kv_event_cap: usize,
}

impl KvCacheManager {
    /// `num_blocks` blocks of `block_size` slots. A `block_size` of 0 is
    /// treated as 1, and `num_blocks` is capped below `u32::MAX` (block ids
    /// are u32), so no input makes this panic.
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        let num_blocks = num_blocks.min(NIL as usize - 1);
        KvCacheManager {
            block_size: block_size.max(1),
            enable_caching: enable_prefix_caching,
            blocks: vec![
                Block {
                    ref_cnt: 0,
                    tag: None
                };
                num_blocks
            ],
            free: FreeQueue::new_full(num_blocks),
            cache: HashMap::new(),
            next_entry_id: ROOT_ENTRY + 1,
            seqs: HashMap::new(),
            hash_fn: chain_hash,
            queries: 0,
            hits: 0,
            preempted_queries: 0,
            preempted_hits: 0,
            kv_events: KvEventQueue::default(),
            kv_event_cap: kv_event_cap(num_blocks),
        }
    }

    /// Token slots per block (at least 1).
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the cache, free or not.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now (includes cached blocks nobody uses).
    pub fn num_free_blocks(&self) -> usize {
        self.free.len
    }

    /// Fraction of blocks in use by some sequence (vLLM's `kv_cache_usage`).
    pub fn usage(&self) -> f32 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        (self.blocks.len() - self.free.len) as f32 / self.blocks.len() as f32
    }

    /// Whether full blocks are registered and looked up (off: every prompt
    /// is computed whole, and no KV events are logged).
    pub fn prefix_caching_enabled(&self) -> bool {
        self.enable_caching
    }

    /// Prefix-cache queries in tokens (first admissions only, as vLLM's
    /// `prefix_cache_queries` metric; recomputes after preemption are counted
    /// in [`Self::preempted_prefix_cache_queries`]).
    pub fn prefix_cache_queries(&self) -> u64 {
        self.queries
    }

    /// Prefix-cache hits in tokens (first admissions only).
    pub fn prefix_cache_hits(&self) -> u64 {
        self.hits
    }

    /// Prefix-cache queries in tokens of sequences readmitted after a
    /// preemption (vLLM counts these apart too, so a preemption storm does not
    /// pass for cache hits).
    pub fn preempted_prefix_cache_queries(&self) -> u64 {
        self.preempted_queries
    }

    /// Prefix-cache hits in tokens of sequences readmitted after a preemption.
    pub fn preempted_prefix_cache_hits(&self) -> u64 {
        self.preempted_hits
    }

    /// The prefix-cache events since the last call, oldest first: replayed
    /// onto what earlier calls returned, they give [`Self::held_block_hashes`].
    /// Always empty with prefix caching off.
    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        self.kv_events.take(usize::MAX)
    }

    /// The chained hash of every registered block, one entry per block (two
    /// blocks with the same content give two entries): what a `Cleared`
    /// followed by these as `Stored` tells a gateway that joins now.
    pub fn held_block_hashes(&self) -> Vec<u64> {
        self.blocks.iter().filter_map(|b| b.tag.map(|t| t.hash)).collect()
    }

    /// Logs a change the manager already made. Folds the log into a snapshot
    /// of the current state once it passes its cap, so an engine whose events
    /// nobody takes holds a bounded log.
    fn record(&mut self, event: KvEvent) {
        if !self.enable_caching {
            return;
        }
        self.kv_events.push(event);
        if self.kv_events.len() > self.kv_event_cap {
            let held = self.held_block_hashes();
            self.kv_events.reset_to(&held);
        }
    }

    /// The sequence's block table, if it holds blocks.
    pub fn block_table(&self, seq: u64) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|s| s.blocks.as_slice())
    }

    /// Number of leading blocks of the sequence that are registered in the cache.
    pub fn num_cached_blocks(&self, seq: u64) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.num_cached)
    }

    /// Sequences holding `block` now (0: free, though perhaps still cached);
    /// None for an id outside the cache.
    pub fn ref_count(&self, block: u32) -> Option<u32> {
        self.blocks.get(block as usize).map(|b| b.ref_cnt)
    }

    /// Whether the block currently holds registered (hittable) content.
    pub fn is_cached(&self, block: u32) -> bool {
        self.blocks
            .get(block as usize)
            .is_some_and(|b| b.tag.is_some())
    }

    /// Token ids a registered block holds, `None` for an unregistered block.
    pub fn cached_block_tokens(&self, block: u32) -> Option<&[u32]> {
        let tag = self.blocks.get(block as usize)?.tag?;
        self.entry(tag).map(|e| &*e.tokens)
    }

    /// Free blocks in eviction order (first = next to be reused).
    pub fn free_queue(&self) -> Vec<u32> {
        self.free.iter().collect()
    }

    /// Longest run of cached full blocks that prefixes `tokens`, leaving at
    /// least one token to compute (the model needs to run one position to
    /// produce logits, even when the whole prompt is cached). `preempted`
    /// says the sequence is being recomputed after preemption (only affects
    /// which counters are bumped). Takes no references.
    pub fn get_computed_blocks(&mut self, tokens: &[u32], preempted: bool) -> CachedPrefix {
        if !self.enable_caching || tokens.is_empty() {
            return CachedPrefix::default();
        }
        let bs = self.block_size;
        let max_blocks = (tokens.len() - 1) / bs;
        let mut out = CachedPrefix::default();
        let (mut parent_hash, mut parent_entry) = (ROOT_HASH, ROOT_ENTRY);
        for chunk in tokens.chunks_exact(bs).take(max_blocks) {
            let h = (self.hash_fn)(parent_hash, chunk);
            let Some(entry) = self.cache.get(&h).and_then(|es| {
                es.iter()
                    .find(|e| e.parent == parent_entry && *e.tokens == *chunk)
            }) else {
                break;
            };
            // Prefer a copy someone already holds: it does not shrink the free pool.
            let block = entry
                .blocks
                .iter()
                .copied()
                .find(|&b| self.blocks[b as usize].ref_cnt > 0)
                .unwrap_or(entry.blocks[0]);
            out.blocks.push(block);
            parent_hash = h;
            parent_entry = entry.id;
        }
        out.num_tokens = out.blocks.len() * bs;
        if preempted {
            self.preempted_queries += tokens.len() as u64;
            self.preempted_hits += out.num_tokens as u64;
        } else {
            self.queries += tokens.len() as u64;
            self.hits += out.num_tokens as u64;
        }
        out
    }

    /// Make the sequence's table cover
    /// `num_computed_tokens + prefix.num_tokens + num_new_tokens` positions, taking references on the `prefix` hit
    /// blocks (only allowed while the sequence holds no blocks, i.e. at
    /// admission), then register the blocks that become full once the
    /// scheduled tokens are computed. `tokens` are the sequence's known token
    /// ids (prompt + outputs).
    ///
    /// Registering at scheduling time, before the model ran, is safe: the
    /// model computes these positions in this very step, and it writes each
    /// layer's K/V for the whole batch before any attention of that layer
    /// reads it. So a sequence that hits such a block in the same step reads
    /// KV that is already written when its attention runs.
    ///
    /// All or nothing: on error nothing changed.
    pub fn allocate_slots(
        &mut self,
        seq: u64,
        tokens: &[u32],
        num_computed_tokens: usize,
        num_new_tokens: usize,
        prefix: &CachedPrefix,
    ) -> Result<(), KvError> {
        let bs = self.block_size;
        let existing = self.seqs.get(&seq).map_or(0, |s| s.blocks.len());
        if !prefix.blocks.is_empty() {
            if existing != 0 || num_computed_tokens != 0 {
                return Err(KvError::Invalid(format!(
                    "sequence {seq} already holds {existing} blocks; prefix hits are only taken at admission"
                )));
            }
            if prefix.num_tokens != prefix.blocks.len() * bs {
                return Err(KvError::Invalid(
                    "prefix token count is not whole blocks".into(),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            if let Some(&b) = prefix.blocks.iter().find(|&&b| !seen.insert(b)) {
                return Err(KvError::Invalid(format!("prefix lists block {b} twice")));
            }
            if let Some(&b) = prefix.blocks.iter().find(|&&b| !self.is_cached(b)) {
                return Err(KvError::Invalid(format!(
                    "prefix block {b} is no longer cached"
                )));
            }
        }
        let computed = num_computed_tokens + prefix.num_tokens;
        let needed_slots = computed + num_new_tokens;
        let have = existing + prefix.blocks.len();
        let to_alloc = needed_slots.div_ceil(bs).saturating_sub(have);
        // Hit blocks nobody holds sit in the free queue: taking them shrinks it.
        let evictable_hits = prefix
            .blocks
            .iter()
            .filter(|&&b| self.blocks[b as usize].ref_cnt == 0)
            .count();
        let free = self.free.len.saturating_sub(evictable_hits);
        if to_alloc > free {
            return Err(KvError::OutOfBlocks {
                needed: to_alloc,
                free,
            });
        }

        for &b in &prefix.blocks {
            let blk = &mut self.blocks[b as usize];
            if blk.ref_cnt == 0 {
                self.free.remove(b);
            }
            blk.ref_cnt += 1;
        }
        let mut new_blocks = Vec::with_capacity(to_alloc);
        for _ in 0..to_alloc {
            // Checked above: the queue holds at least `to_alloc` blocks.
            let Some(b) = self.free.pop_front() else {
                break;
            };
            self.evict(b);
            self.blocks[b as usize].ref_cnt = 1;
            new_blocks.push(b);
        }
        let entry = self.seqs.entry(seq).or_default();
        if !prefix.blocks.is_empty() {
            entry.blocks.extend_from_slice(&prefix.blocks);
            entry.num_cached = prefix.blocks.len();
        }
        entry.blocks.extend_from_slice(&new_blocks);

        if self.enable_caching {
            let num_full = needed_slots.min(tokens.len()) / bs;
            self.cache_full_blocks(seq, tokens, num_full);
        }
        Ok(())
    }

    /// Register the sequence's blocks `num_cached..num_full` (in order, so
    /// each block's parent is already registered).
    fn cache_full_blocks(&mut self, seq: u64, tokens: &[u32], num_full: usize) {
        let bs = self.block_size;
        let Some(sb) = self.seqs.get(&seq) else {
            return;
        };
        let num_full = num_full.min(sb.blocks.len());
        let start = sb.num_cached;
        if start >= num_full {
            return;
        }
        let table: Vec<u32> = sb.blocks[..num_full].to_vec();
        let (mut parent_hash, mut parent_entry) = if start == 0 {
            (ROOT_HASH, ROOT_ENTRY)
        } else {
            match self.blocks[table[start - 1] as usize].tag {
                Some(t) => (t.hash, t.entry),
                // Cannot happen (held blocks are never evicted); stay safe by
                // not registering anything that could not be chained exactly.
                None => return,
            }
        };
        for (i, &b) in table.iter().enumerate().skip(start) {
            let chunk = &tokens[i * bs..(i + 1) * bs];
            if let Some(t) = self.blocks[b as usize].tag {
                // Already registered (cannot happen for fresh blocks); keep its chain.
                parent_hash = t.hash;
                parent_entry = t.entry;
                continue;
            }
            let h = (self.hash_fn)(parent_hash, chunk);
            let bucket = self.cache.entry(h).or_default();
            let id = match bucket
                .iter_mut()
                .find(|e| e.parent == parent_entry && *e.tokens == *chunk)
            {
                Some(e) => {
                    e.blocks.push(b);
                    e.id
                }
                None => {
                    let id = self.next_entry_id;
                    self.next_entry_id += 1;
                    bucket.push(Entry {
                        id,
                        parent: parent_entry,
                        tokens: chunk.into(),
                        blocks: vec![b],
                    });
                    id
                }
            };
            self.blocks[b as usize].tag = Some(CacheTag { hash: h, entry: id });
            self.record(KvEvent::Stored(h));
            parent_hash = h;
            parent_entry = id;
        }
        if let Some(sb) = self.seqs.get_mut(&seq) {
            sb.num_cached = num_full;
        }
    }

    /// Drop a block's cache registration (it is about to be overwritten).
    fn evict(&mut self, b: u32) {
        let Some(tag) = self.blocks[b as usize].tag.take() else {
            return;
        };
        // The block is unregistered from here on, whatever the map holds.
        self.record(KvEvent::Removed(tag.hash));
        let Some(bucket) = self.cache.get_mut(&tag.hash) else {
            return;
        };
        if let Some(pos) = bucket.iter().position(|e| e.id == tag.entry) {
            let e = &mut bucket[pos];
            e.blocks.retain(|&x| x != b);
            if e.blocks.is_empty() {
                bucket.swap_remove(pos);
            }
        }
        if bucket.is_empty() {
            self.cache.remove(&tag.hash);
        }
    }

    fn entry(&self, tag: CacheTag) -> Option<&Entry> {
        self.cache
            .get(&tag.hash)?
            .iter()
            .find(|e| e.id == tag.entry)
    }

    /// Release all of the sequence's blocks; returns false if it held none.
    /// Blocks are released tail first, so among equally old cached blocks a
    /// sequence's tail is evicted before its (more shareable) head.
    pub fn free(&mut self, seq: u64) -> bool {
        let Some(sb) = self.seqs.remove(&seq) else {
            return false;
        };
        for &b in sb.blocks.iter().rev() {
            let blk = &mut self.blocks[b as usize];
            blk.ref_cnt = blk.ref_cnt.saturating_sub(1);
            if blk.ref_cnt == 0 {
                if blk.tag.is_some() {
                    self.free.push_back(b);
                } else {
                    self.free.push_front(b);
                }
            }
        }
        true
    }

    /// Evict every cached block nobody holds (vLLM's `reset_prefix_cache`,
    /// e.g. after weights change). Blocks in use keep their registration.
    /// The event log becomes `Cleared` and the blocks still registered: one
    /// short message instead of a `Removed` per evicted block.
    pub fn reset_prefix_cache(&mut self) {
        let free: Vec<u32> = self.free.iter().collect();
        for b in free {
            self.evict(b);
        }
        if self.enable_caching {
            let held = self.held_block_hashes();
            self.kv_events.reset_to(&held);
        }
    }

    /// Check the manager's internal consistency (for tests and debug builds):
    /// ref counts equal the number of tables holding each block, the free
    /// queue holds exactly the unreferenced blocks, no block appears twice in
    /// one table, a block shared by several tables is registered, and every
    /// registration is consistent with the cache map and its parent chain.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut refs = vec![0u32; self.blocks.len()];
        for (seq, sb) in &self.seqs {
            let mut seen = std::collections::HashSet::new();
            for &b in &sb.blocks {
                if b as usize >= self.blocks.len() {
                    return Err(format!("seq {seq}: block {b} out of range"));
                }
                if !seen.insert(b) {
                    return Err(format!("seq {seq}: block {b} twice in its table"));
                }
                refs[b as usize] += 1;
            }
            if sb.num_cached > sb.blocks.len() {
                return Err(format!("seq {seq}: num_cached beyond its table"));
            }
            let mut parent = ROOT_ENTRY;
            for (i, &b) in sb.blocks[..sb.num_cached].iter().enumerate() {
                let Some(tag) = self.blocks[b as usize].tag else {
                    return Err(format!("seq {seq}: cached block #{i} ({b}) not registered"));
                };
                let Some(e) = self.entry(tag) else {
                    return Err(format!(
                        "seq {seq}: block {b} registered to a missing entry"
                    ));
                };
                if e.parent != parent {
                    return Err(format!(
                        "seq {seq}: block #{i} ({b}) chained to the wrong parent"
                    ));
                }
                parent = e.id;
            }
        }
        for (b, blk) in self.blocks.iter().enumerate() {
            if blk.ref_cnt != refs[b] {
                return Err(format!(
                    "block {b}: ref count {} but held by {} tables",
                    blk.ref_cnt, refs[b]
                ));
            }
            if refs[b] > 1 && blk.tag.is_none() {
                return Err(format!(
                    "block {b}: shared by {} tables but not cached",
                    refs[b]
                ));
            }
            if (blk.ref_cnt == 0) != self.free.contains(b as u32) {
                return Err(format!(
                    "block {b}: ref count {} vs free-queue membership",
                    blk.ref_cnt
                ));
            }
            if let Some(tag) = blk.tag {
                match self.entry(tag) {
                    Some(e) if e.blocks.contains(&(b as u32)) => {}
                    _ => return Err(format!("block {b}: tag without matching cache entry")),
                }
            }
        }
        if self.free.iter().count() != self.free.len {
            return Err("free queue length mismatch".into());
        }
        for (h, bucket) in &self.cache {
            for e in bucket {
                if e.blocks.is_empty() {
                    return Err(format!("empty cache entry {} in bucket {h:#x}", e.id));
                }
                for &b in &e.blocks {
                    if self.blocks[b as usize].tag
                        != Some(CacheTag {
                            hash: *h,
                            entry: e.id,
                        })
                    {
                        return Err(format!(
                            "entry {} lists block {b} that is not tagged with it",
                            e.id
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Check that the sequence's registered blocks hold exactly `tokens`'
    /// leading full blocks (the KV they hold was computed for these tokens).
    pub fn check_seq_contents(&self, seq: u64, tokens: &[u32]) -> Result<(), String> {
        let bs = self.block_size;
        let Some(sb) = self.seqs.get(&seq) else {
            return Ok(());
        };
        for (i, &b) in sb.blocks[..sb.num_cached].iter().enumerate() {
            let want = tokens.get(i * bs..(i + 1) * bs);
            if self.cached_block_tokens(b) != want {
                return Err(format!(
                    "seq {seq}: cached block #{i} ({b}) holds other tokens"
                ));
            }
        }
        Ok(())
    }

    /// Tests force hash collisions to prove look-ups stay exact.
    #[cfg(test)]
    pub(crate) fn set_hash_fn(&mut self, f: fn(u64, &[u32]) -> u64) {
        self.hash_fn = f;
    }

    /// Tests fold the event log early to prove a fold keeps it exact.
    #[cfg(test)]
    pub(crate) fn set_kv_event_cap(&mut self, cap: usize) {
        self.kv_event_cap = cap;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(kv: &mut KvCacheManager, seq: u64, tokens: &[u32]) -> CachedPrefix {
        let p = kv.get_computed_blocks(tokens, false);
        let n = tokens.len() - p.num_tokens;
        kv.allocate_slots(seq, tokens, 0, n, &p).unwrap();
        kv.check_invariants().unwrap();
        p
    }

    /// Applies `events` to a multiset of hashes, as a gateway would.
    fn replay(set: &mut HashMap<u64, usize>, events: &[KvEvent]) {
        for e in events {
            match *e {
                KvEvent::Cleared => set.clear(),
                KvEvent::Stored(h) => *set.entry(h).or_default() += 1,
                KvEvent::Removed(h) => {
                    let n = set.get_mut(&h).expect("removed a block never stored");
                    *n -= 1;
                    if *n == 0 {
                        set.remove(&h);
                    }
                }
            }
        }
    }

    fn multiset(hashes: &[u64]) -> HashMap<u64, usize> {
        let mut set = HashMap::new();
        for &h in hashes {
            *set.entry(h).or_default() += 1;
        }
        set
    }

    #[test]
    fn registrations_evictions_and_resets_are_logged() {
        use KvEvent::*;
        let mut kv = KvCacheManager::new(4, 2, true);
        let h0 = chain_hash(ROOT_HASH, &[1, 2]);
        let h1 = chain_hash(h0, &[3, 4]);
        alloc(&mut kv, 1, &[1, 2, 3, 4, 5]);
        assert_eq!(kv.take_kv_events(), vec![Stored(h0), Stored(h1)]);
        assert!(kv.take_kv_events().is_empty(), "taken once");
        // A hit takes references; it registers nothing new.
        alloc(&mut kv, 2, &[1, 2, 3, 4, 6]);
        assert!(kv.take_kv_events().is_empty());
        kv.free(1);
        kv.free(2);
        assert!(kv.take_kv_events().is_empty(), "freed blocks stay cached");
        // Four fresh blocks: the uncached ones go first, then block 1 (h1,
        // the tail) and block 0 (h0) are evicted; [9, 9] is registered.
        kv.allocate_slots(3, &[9; 8], 0, 2, &CachedPrefix::default()).unwrap();
        kv.allocate_slots(3, &[9; 8], 2, 6, &CachedPrefix::default()).unwrap();
        // The same tokens under different parents: four distinct hashes.
        let mut nines = vec![chain_hash(ROOT_HASH, &[9, 9])];
        for _ in 1..4 {
            nines.push(chain_hash(nines[nines.len() - 1], &[9, 9]));
        }
        assert_eq!(
            kv.take_kv_events(),
            vec![Stored(nines[0]), Removed(h1), Removed(h0), Stored(nines[1]), Stored(nines[2]), Stored(nines[3])]
        );
        assert_eq!(multiset(&kv.held_block_hashes()), multiset(&nines));
        // Sequence 4 evicts two of the nines; the reset evicts the other two,
        // drops those untaken events, and says Cleared, then what is still
        // registered: sequence 4's full block, in use.
        kv.free(3);
        alloc(&mut kv, 4, &[7, 7, 7]);
        kv.reset_prefix_cache();
        assert_eq!(kv.take_kv_events(), vec![Cleared, Stored(chain_hash(ROOT_HASH, &[7, 7]))]);
    }

    #[test]
    fn disabled_caching_logs_nothing() {
        let mut kv = KvCacheManager::new(4, 2, false);
        alloc(&mut kv, 1, &[1, 2, 3, 4, 5]);
        kv.free(1);
        alloc(&mut kv, 2, &[5, 6, 7, 8]);
        kv.reset_prefix_cache();
        assert!(kv.take_kv_events().is_empty());
        assert!(kv.held_block_hashes().is_empty());
    }

    /// Random admissions, chunked prefills, decodes, frees and resets on a
    /// small cache (so evictions are frequent, and a small alphabet so
    /// prefixes are shared and duplicated): the events, replayed, always give
    /// exactly the registered blocks. With `cap` the log is folded often.
    fn replay_matches_held(cap: Option<usize>, seed: u64) {
        let mut rng = seed;
        let mut next = |n: u64| {
            // A 64-bit LCG (Knuth's MMIX constants); the high bits are good enough here.
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 33) % n
        };
        let mut kv = KvCacheManager::new(12, 2, true);
        if let Some(cap) = cap {
            kv.set_kv_event_cap(cap);
        }
        // seq -> (tokens, tokens scheduled so far)
        let mut seqs: HashMap<u64, (Vec<u32>, usize)> = HashMap::new();
        let mut seen = HashMap::new();
        let mut next_seq = 0;
        let (mut evictions, mut duplicates) = (0, false);
        for step in 0..3000 {
            match next(10) {
                0..=2 => {
                    let len = 1 + next(9) as usize;
                    let tokens: Vec<u32> = (0..len).map(|_| next(3) as u32).collect();
                    let p = kv.get_computed_blocks(&tokens, false);
                    let n = 1 + next((len - p.num_tokens) as u64) as usize;
                    if kv.allocate_slots(next_seq, &tokens, 0, n, &p).is_ok() {
                        seqs.insert(next_seq, (tokens, p.num_tokens + n));
                    }
                    next_seq += 1;
                }
                3..=5 if !seqs.is_empty() => {
                    // Schedule more of a sequence: the rest of its prompt, or one decode token.
                    let &id = seqs.keys().nth(next(seqs.len() as u64) as usize).unwrap();
                    let (tokens, done) = seqs.get_mut(&id).unwrap();
                    if *done == tokens.len() {
                        tokens.push(next(3) as u32);
                    }
                    let n = 1 + next((tokens.len() - *done) as u64) as usize;
                    if kv.allocate_slots(id, tokens, *done, n, &CachedPrefix::default()).is_ok() {
                        *done += n;
                    }
                }
                6..=8 if !seqs.is_empty() => {
                    let &id = seqs.keys().nth(next(seqs.len() as u64) as usize).unwrap();
                    seqs.remove(&id);
                    kv.free(id);
                }
                9 if next(8) == 0 => kv.reset_prefix_cache(),
                _ => {}
            }
            kv.check_invariants().unwrap();
            if next(3) == 0 {
                let events = kv.take_kv_events();
                evictions += events.iter().filter(|e| matches!(e, KvEvent::Removed(_))).count();
                replay(&mut seen, &events);
                assert_eq!(seen, multiset(&kv.held_block_hashes()), "step {step}");
                duplicates |= seen.values().any(|&n| n > 1);
            }
            if let Some(cap) = cap {
                assert!(kv.kv_events.len() <= cap.max(kv.num_blocks() + 1), "the log stays bounded");
            }
        }
        replay(&mut seen, &kv.take_kv_events());
        assert_eq!(seen, multiset(&kv.held_block_hashes()));
        if cap.is_none() {
            assert!(evictions > 0 && duplicates, "the run covers evictions ({evictions}) and duplicate blocks");
        }
    }

    #[test]
    fn replayed_events_always_give_the_held_blocks() {
        for seed in 0..8 {
            replay_matches_held(None, seed);
        }
    }

    #[test]
    fn a_folded_log_still_replays_to_the_held_blocks() {
        for seed in 0..8 {
            replay_matches_held(Some(5), seed);
        }
    }

    #[test]
    fn an_event_queue_takes_in_order_and_a_clear_drops_what_came_before() {
        use KvEvent::*;
        let mut q = KvEventQueue::default();
        q.extend([Stored(1), Stored(2), Removed(1)]);
        assert_eq!(q.take(2), vec![Stored(1), Stored(2)]);
        q.extend([Stored(3), Cleared, Stored(4)]);
        assert_eq!(q.take(10), vec![Cleared, Stored(4)], "Removed(1) and Stored(3) are moot after Cleared");
        assert!(q.is_empty());
        q.push(Stored(5));
        q.reset_to(&[6, 6]);
        assert_eq!(q.take(usize::MAX), vec![Cleared, Stored(6), Stored(6)]);
        assert!(kv_event_cap(10) >= 4 * MAX_KV_EVENTS && kv_event_cap(1 << 20) >= 2 << 20);
    }

    #[test]
    fn chain_hash_is_stable_and_chains() {
        // Known value pins the function (a change would silently drop caches
        // shared across processes).
        let a = chain_hash(ROOT_HASH, &[1, 2, 3, 4]);
        assert_eq!(a, chain_hash(ROOT_HASH, &[1, 2, 3, 4]));
        assert_ne!(a, chain_hash(ROOT_HASH, &[1, 2, 3, 5]));
        assert_ne!(a, chain_hash(ROOT_HASH, &[4, 3, 2, 1]));
        // Same block tokens under another parent hash differ.
        let b1 = chain_hash(a, &[9, 9, 9, 9]);
        let b2 = chain_hash(chain_hash(ROOT_HASH, &[7, 7, 7, 7]), &[9, 9, 9, 9]);
        assert_ne!(b1, b2);
        // Length is part of the input: [] vs [0] differ.
        assert_ne!(chain_hash(ROOT_HASH, &[]), chain_hash(ROOT_HASH, &[0]));
    }

    #[test]
    fn shared_prefix_hits_full_blocks_only() {
        let mut kv = KvCacheManager::new(32, 4, true);
        let prompt: Vec<u32> = (0..10).collect(); // 2 full blocks + 2 tokens
        let p0 = alloc(&mut kv, 1, &prompt);
        assert_eq!(p0.num_tokens, 0);
        let t1 = kv.block_table(1).unwrap().to_vec();
        assert_eq!(t1.len(), 3);
        assert_eq!(kv.num_cached_blocks(1), 2);
        // n more sequences with the same prompt share its two full blocks.
        for s in 2..6u64 {
            let p = alloc(&mut kv, s, &prompt);
            assert_eq!(p.num_tokens, 8);
            assert_eq!(p.blocks, t1[..2].to_vec());
            let t = kv.block_table(s).unwrap();
            assert_eq!(&t[..2], &t1[..2]);
            assert_ne!(t[2], t1[2]); // the partial block is private
        }
        assert_eq!(kv.ref_count(t1[0]), Some(5));
        assert_eq!(kv.ref_count(t1[1]), Some(5));
        assert_eq!(kv.ref_count(t1[2]), Some(1));
        // Counters: 5 queries of 10 tokens, 4 hits of 8 tokens.
        assert_eq!(kv.prefix_cache_queries(), 50);
        assert_eq!(kv.prefix_cache_hits(), 32);
        // Same second block under a different first block: no hit past block 0.
        let mut other = prompt.clone();
        other[0] = 99;
        let p = kv.get_computed_blocks(&other, false);
        assert_eq!(p.num_tokens, 0);
        let mut other = prompt.clone();
        other[5] = 99;
        let p = kv.get_computed_blocks(&other, false);
        assert_eq!(p.num_tokens, 4);
    }

    #[test]
    fn whole_prompt_hit_leaves_one_token() {
        let mut kv = KvCacheManager::new(16, 4, true);
        let prompt: Vec<u32> = (0..8).collect(); // exactly 2 blocks
        alloc(&mut kv, 1, &prompt);
        assert_eq!(kv.num_cached_blocks(1), 2);
        let p = kv.get_computed_blocks(&prompt, false);
        // Only block 0 may be used: the last token must be computed.
        assert_eq!(p.num_tokens, 4);
        let longer: Vec<u32> = (0..9).collect();
        assert_eq!(kv.get_computed_blocks(&longer, false).num_tokens, 8);
    }

    #[test]
    fn blocks_register_only_when_scheduled_through() {
        let mut kv = KvCacheManager::new(16, 4, true);
        let prompt: Vec<u32> = (0..10).collect();
        // First chunk: 6 tokens -> block 0 full and computed, block 1 half.
        kv.allocate_slots(1, &prompt, 0, 6, &CachedPrefix::default())
            .unwrap();
        assert_eq!(kv.block_table(1).unwrap().len(), 2);
        assert_eq!(kv.num_cached_blocks(1), 1);
        assert_eq!(kv.get_computed_blocks(&prompt, false).num_tokens, 4);
        // Second chunk: the rest.
        kv.allocate_slots(1, &prompt, 6, 4, &CachedPrefix::default())
            .unwrap();
        assert_eq!(kv.num_cached_blocks(1), 2);
        assert_eq!(kv.get_computed_blocks(&prompt, false).num_tokens, 8);
        kv.check_invariants().unwrap();
        // A decode that completes block 2 registers it once its token is known.
        let mut toks = prompt.clone();
        toks.extend([10, 11]); // 12 tokens, computed 10
        kv.allocate_slots(1, &toks, 10, 2, &CachedPrefix::default())
            .unwrap();
        assert_eq!(kv.num_cached_blocks(1), 3);
        kv.check_seq_contents(1, &toks).unwrap();
    }

    #[test]
    fn lru_eviction_order() {
        let mut kv = KvCacheManager::new(6, 2, true);
        // A: blocks [0,1] full + cached; B: blocks [2,3].
        let a = [1u32, 1, 2, 2];
        let b = [3u32, 3, 4, 4];
        alloc(&mut kv, 1, &a);
        alloc(&mut kv, 2, &b);
        assert_eq!(kv.block_table(1).unwrap(), &[0, 1]);
        assert_eq!(kv.block_table(2).unwrap(), &[2, 3]);
        assert_eq!(kv.free_queue(), vec![4, 5]);
        kv.free(1);
        kv.free(2);
        // Freed tail-first and appended: A's tail, A's head, B's tail, B's head.
        assert_eq!(kv.free_queue(), vec![4, 5, 1, 0, 3, 2]);
        assert!(kv.is_cached(0) && kv.is_cached(3));
        // Still hittable while free.
        let a3 = [1u32, 1, 2, 2, 7];
        assert_eq!(kv.get_computed_blocks(&a3, false).blocks, vec![0, 1]);
        // A 4-block allocation evicts the two never-cached blocks, then A's
        // tail (1), then A's head (0): least recently freed first.
        let c = [5u32, 6, 7, 8, 9, 10, 11, 12];
        kv.allocate_slots(3, &c, 0, 8, &CachedPrefix::default())
            .unwrap();
        assert_eq!(kv.block_table(3).unwrap(), &[4, 5, 1, 0]);
        assert_eq!(kv.get_computed_blocks(&a3, false).num_tokens, 0);
        let b3 = [3u32, 3, 4, 4, 7];
        assert_eq!(kv.get_computed_blocks(&b3, false).blocks, vec![2, 3]);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn uncached_blocks_are_reused_first() {
        let mut kv = KvCacheManager::new(4, 2, true);
        alloc(&mut kv, 1, &[1, 2, 3]); // block 0 cached, block 1 partial
        kv.free(1);
        // The partial block went to the head, the cached one to the tail.
        assert_eq!(kv.free_queue(), vec![1, 2, 3, 0]);
    }

    #[test]
    fn hit_on_free_cached_block_leaves_free_queue() {
        let mut kv = KvCacheManager::new(4, 2, true);
        alloc(&mut kv, 1, &[1, 2, 3, 4, 5]);
        kv.free(1);
        assert_eq!(kv.num_free_blocks(), 4);
        let p = alloc(&mut kv, 2, &[1, 2, 3, 4, 6]);
        assert_eq!(p.blocks, vec![0, 1]);
        assert_eq!(kv.ref_count(0), Some(1));
        assert!(!kv.free_queue().contains(&0) && !kv.free_queue().contains(&1));
        assert_eq!(kv.num_free_blocks(), 1);
        assert!((kv.usage() - 0.75).abs() < 1e-6);
    }

    #[test]
    fn out_of_blocks_counts_evictable_hits() {
        let mut kv = KvCacheManager::new(3, 2, true);
        alloc(&mut kv, 1, &[1, 2, 3, 4, 5]); // blocks 0,1 cached, 2 partial
        kv.free(1);
        // Needs hit blocks 0,1 (both free) plus 2 new: 4 > 3 blocks.
        let toks = [1u32, 2, 3, 4, 5, 6, 7];
        let p = kv.get_computed_blocks(&toks, false);
        assert_eq!(p.num_tokens, 4);
        let err = kv.allocate_slots(2, &toks, 0, 3, &p).unwrap_err();
        assert_eq!(err, KvError::OutOfBlocks { needed: 2, free: 1 });
        // Nothing changed.
        assert_eq!(kv.num_free_blocks(), 3);
        assert!(kv.block_table(2).is_none());
        kv.check_invariants().unwrap();
    }

    #[test]
    fn collisions_never_serve_wrong_blocks() {
        // Every block hashes to one of two buckets: look-ups must still match
        // only identical prefixes.
        fn bad_hash(_: u64, t: &[u32]) -> u64 {
            u64::from(t[0] % 2)
        }
        let mut kv = KvCacheManager::new(64, 2, true);
        kv.set_hash_fn(bad_hash);
        let seqs: Vec<Vec<u32>> = vec![
            vec![0, 1, 2, 3, 4],
            vec![0, 1, 2, 5, 4],
            vec![2, 1, 2, 3, 4],
            vec![0, 1, 4, 3, 4],
            vec![2, 1, 0, 1, 4],
        ];
        for (i, s) in seqs.iter().enumerate() {
            let p = alloc(&mut kv, i as u64, s);
            // Reference: longest common full-block prefix with any earlier
            // sequence, capped to leave one token.
            let mut want = 0;
            for e in &seqs[..i] {
                let mut n = 0;
                while n + 2 < s.len() && e[..n + 2] == s[..n + 2] {
                    n += 2;
                }
                want = want.max(n);
            }
            assert_eq!(p.num_tokens, want, "seq {i}");
            kv.check_seq_contents(i as u64, s).unwrap();
        }
        // Every bucket now holds several entries; only the exact chain hits.
        // [0,1] then [0,1]: the second [0,1] exists only under parent [2,1].
        assert_eq!(
            kv.get_computed_blocks(&[0, 1, 4, 3, 9], false).num_tokens,
            4
        );
        assert_eq!(
            kv.get_computed_blocks(&[2, 1, 0, 1, 9], false).num_tokens,
            4
        );
        assert_eq!(
            kv.get_computed_blocks(&[0, 1, 0, 1, 9], false).num_tokens,
            2
        );
    }

    #[test]
    fn duplicate_contents_and_eviction_keep_cache_consistent() {
        let mut kv = KvCacheManager::new(8, 2, true);
        let t = [1u32, 2, 3, 4, 5];
        // Both admitted before either is cached: two copies of the same content.
        kv.allocate_slots(1, &t, 0, 5, &CachedPrefix::default())
            .unwrap();
        kv.allocate_slots(2, &t, 0, 5, &CachedPrefix::default())
            .unwrap();
        kv.check_invariants().unwrap();
        kv.free(1);
        let p = kv.get_computed_blocks(&t, false);
        // Prefers the copy still held by sequence 2.
        assert_eq!(p.blocks, kv.block_table(2).unwrap()[..2].to_vec());
        kv.free(2);
        // Evict everything by allocating all blocks.
        kv.allocate_slots(3, &[0; 16], 0, 16, &CachedPrefix::default())
            .unwrap();
        assert_eq!(kv.num_free_blocks(), 0);
        assert_eq!(kv.get_computed_blocks(&t, false).num_tokens, 0);
        kv.check_invariants().unwrap();
        kv.free(3);
        assert!(kv.free_queue().len() == 8);
    }

    #[test]
    fn disabled_caching_never_hits_or_counts() {
        let mut kv = KvCacheManager::new(8, 2, false);
        alloc(&mut kv, 1, &[1, 2, 3, 4, 5]);
        let p = alloc(&mut kv, 2, &[1, 2, 3, 4, 5]);
        assert_eq!(p.num_tokens, 0);
        assert!(!kv.is_cached(kv.block_table(1).unwrap()[0]));
        assert_eq!(kv.prefix_cache_queries(), 0);
        assert_eq!(kv.prefix_cache_hits(), 0);
    }

    #[test]
    fn preempted_lookups_count_separately() {
        let mut kv = KvCacheManager::new(8, 2, true);
        alloc(&mut kv, 1, &[1, 2, 3]);
        kv.get_computed_blocks(&[1, 2, 3], true);
        assert_eq!(kv.prefix_cache_queries(), 3);
        assert_eq!(kv.prefix_cache_hits(), 0);
        assert_eq!(kv.preempted_prefix_cache_queries(), 3);
        assert_eq!(kv.preempted_prefix_cache_hits(), 2);
    }

    #[test]
    fn bad_calls_are_errors_not_panics() {
        let mut kv = KvCacheManager::new(8, 0, true); // block size 0 -> 1
        assert_eq!(kv.block_size(), 1);
        alloc(&mut kv, 1, &[1, 2, 3]);
        let p = kv.get_computed_blocks(&[1, 2, 3], false);
        // Prefix hits for a sequence that already holds blocks.
        assert!(matches!(
            kv.allocate_slots(1, &[1, 2, 3], 0, 1, &p),
            Err(KvError::Invalid(_))
        ));
        // A stale prefix (its blocks were evicted) is refused.
        kv.free(1);
        kv.reset_prefix_cache();
        assert!(matches!(
            kv.allocate_slots(2, &[1, 2, 3], 0, 1, &p),
            Err(KvError::Invalid(_))
        ));
        // A hand-made prefix listing a block twice or out of range is refused.
        alloc(&mut kv, 3, &[5, 6, 7]);
        let b = kv.block_table(3).unwrap()[0];
        let dup = CachedPrefix {
            blocks: vec![b, b],
            num_tokens: 2,
        };
        assert!(matches!(
            kv.allocate_slots(4, &[5, 5, 5], 0, 1, &dup),
            Err(KvError::Invalid(_))
        ));
        let far = CachedPrefix {
            blocks: vec![1000],
            num_tokens: 1,
        };
        assert!(matches!(
            kv.allocate_slots(4, &[5, 5], 0, 1, &far),
            Err(KvError::Invalid(_))
        ));
        assert!(!kv.free(42));
        assert_eq!(KvCacheManager::new(0, 4, true).usage(), 0.0);
        kv.check_invariants().unwrap();
    }
}
