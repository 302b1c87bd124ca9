//! Single-stream decode on a team: the pool's threads run the whole forward
//! pass of a one-token step together, instead of entering a parallel region
//! (a job injected, a sleeping thread woken, a join) once per operation.
//!
//! The step is a list of phases, five a layer (q/k/v, attention, the output
//! projection, gate/up with SwiGLU, down) and the LM head. Each thread owns
//! an even, contiguous share of every phase's rows (of the query heads,
//! for attention), cut into a few pieces that it claims in order, so on a quiet
//! machine each thread streams its own share of every matrix from start to
//! end, as a static split would; a thread that runs out of its own pieces
//! takes what is left of the others' from their ends. Each thread quantizes
//! a phase's input itself before its first piece, so the kernels read it from
//! their own core's cache. The thread that completes a phase runs the small
//! serial pieces that come before the next one (biases, rope and the KV
//! writes; residual adds and norms) and opens it. The others wait for it
//! spinning, and sleep only when the wait is long (a busy machine). Nothing
//! waits for a thread that is not running: a thread the scheduler holds back
//! finds its share taken and skips ahead, and the calling thread runs a
//! helper's job itself (to find nothing left) if the pool has not started it.
//!
//! Every value is computed by the same kernel on the same inputs as on the
//! per-operation path (`CpuShard::forward`'s parallel regions), so the bits are
//! the same: chunks start at multiples of the kernels' row groups, and the
//! serial pieces are the same calls on the same buffers.

use super::attention::{attend_unit, AttnSeq, KvLayer};
use super::kernels::{Prepared, SHARE_ALIGN};
use super::kv::KvStore;
use super::profile::{self, Part};
use super::{ops, CpuShard};
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(true);
static ENV_READ: std::sync::Once = std::sync::Once::new();

/// Whether single-stream decode steps run on the team (the default; the
/// variable `FERRY_DECODE_TEAM=0` or [`set_enabled`] turns it off, for A/B
/// runs and tests).
pub fn enabled() -> bool {
    ENV_READ.call_once(|| {
        if std::env::var("FERRY_DECODE_TEAM").is_ok_and(|v| v.trim() == "0") {
            ENABLED.store(false, Ordering::Relaxed);
        }
    });
    ENABLED.load(Ordering::Relaxed)
}

/// Turns the team on or off for the whole process.
pub fn set_enabled(on: bool) {
    ENV_READ.call_once(|| {});
    ENABLED.store(on, Ordering::Relaxed);
}

/// How long a waiting thread spins before it sleeps. The serial pieces
/// between phases take microseconds, so on a quiet machine the threads meet
/// while spinning; on a busy one (more runnable threads than cores) a spinning
/// thread would burn the time slice the thread it waits for needs, and the
/// scheduler's favour with it, so it sleeps instead, as rayon's workers do.
const SPIN: Duration = Duration::from_micros(20);

/// Fewest pieces a thread's share of a matrix is cut into: what the other
/// threads can take from it when it is slowed.
const PIECES: usize = 4;

/// Most pieces a share of a matrix is cut into (a phase's pieces per thread,
/// three matrices at most, must fit the `taken` bits of a usize).
const MAX_PIECES: usize = 16;

/// Weight bytes a piece holds at least, where a share has room for more than
/// [`PIECES`] of them. Where the last piece of a phase ends is where the
/// other thread stops and waits, so smaller pieces on large matrices leave
/// less waiting: on a Llama-3.2-1B shape (pieces of 0.3-18 MB at 4 a share)
/// the waits went from 2.3-2.8 ms a token to 1.1-1.4 at 16 pieces. Pieces of
/// a few KiB cost more than they save (the default model's shares at 16
/// pieces: its matmuls 10-30% slower), hence the floor.
const PIECE_BYTES: usize = 512 << 10;

/// A counter on a cache line of its own.
#[repr(align(128))]
#[derive(Default)]
struct Line(AtomicUsize);

/// One phase's counters.
#[repr(align(128))]
#[derive(Default)]
struct Slot {
    /// Pieces completed.
    done: AtomicUsize,
    /// When the phase opened, in nanoseconds from the step's start (profile only).
    opened: AtomicU64,
}

/// A buffer the team shares. Within a phase, threads write only their own
/// chunks' parts and read only what earlier phases (or the serial pieces
/// before this one) wrote.
#[derive(Clone, Copy)]
struct Shared {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: a Shared points into a buffer the step owns for the whole team run,
// which outlives every thread's use; the phases order every write before the
// reads of it, and the writes within a phase are to disjoint parts.
unsafe impl Send for Shared {}
// SAFETY: as for Send: shared references only copy the pointer out.
unsafe impl Sync for Shared {}

impl Shared {
    fn new(v: &mut [f32]) -> Shared {
        Shared { ptr: v.as_mut_ptr(), len: v.len() }
    }

    /// Values `r`, to write.
    ///
    /// # Safety
    /// No other thread reads or writes them until the phase ends.
    #[allow(clippy::mut_from_ref, reason = "the buffer is shared by the team's threads, each writing its own parts within a phase; the exclusivity is the caller's promise")]
    unsafe fn part(&self, r: Range<usize>) -> &mut [f32] {
        assert!(r.start <= r.end && r.end <= self.len, "team buffer part out of range");
        // SAFETY: in bounds (asserted); exclusive by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.len()) }
    }

    /// Every value, to read.
    ///
    /// # Safety
    /// No thread writes any of them until the phase ends.
    unsafe fn all(&self) -> &[f32] {
        // SAFETY: the whole buffer; nothing writes it meanwhile (the caller's promise).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Every value, to write.
    ///
    /// # Safety
    /// No other thread reads or writes any of them until the phase ends.
    #[allow(clippy::mut_from_ref, reason = "as for `part`: the serial pieces between phases have the buffers to themselves")]
    unsafe fn all_mut(&self) -> &mut [f32] {
        // SAFETY: the whole buffer; exclusive by the caller's promise.
        unsafe { self.part(0..self.len) }
    }
}

/// One layer's K and V arrays.
#[derive(Clone, Copy)]
struct KvPtrs {
    k: *mut f16,
    v: *mut f16,
    len: usize,
}

// SAFETY: the arrays belong to the KvStore the step borrows mutably for the
// whole team run; they are written only by the serial piece after a layer's
// q/k/v phase, and read only in the attention phase that follows.
unsafe impl Send for KvPtrs {}
// SAFETY: as for Send.
unsafe impl Sync for KvPtrs {}

/// The step's buffers.
struct Bufs {
    x: Shared,
    xn: Shared,
    q: Shared,
    k: Shared,
    v: Shared,
    attn: Shared,
    proj: Shared,
    gate: Shared,
    up: Shared,
    logits: Shared,
}

/// A phase's work.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Qkv,
    Attention,
    Out,
    GateUp,
    Down,
    LmHead,
}

impl Kind {
    /// Where the kind's pieces are in `Step::pieces`.
    fn index(self) -> usize {
        self as usize
    }
}

const KINDS: usize = 6;
const PER_LAYER: usize = 5;

/// A piece of a phase's work: rows of one of its matrices (of the
/// matmul's inputs, in order: q, k, v; gate and up share their rows), or KV heads.
type Piece = (usize, Range<usize>);

/// Each thread's pieces of the matrices of `(rows, bytes a row)` each: thread
/// i's share of every matrix is the i-th of an even split starting at
/// multiples of the kernels' row group, cut into [`PIECES`] to
/// [`MAX_PIECES`] pieces of about [`PIECE_BYTES`] or more, also so aligned.
fn split(mats: &[(usize, usize)], threads: usize) -> Vec<Vec<Piece>> {
    (0..threads)
        .map(|i| {
            let mut pieces = Vec::new();
            for (m, &(n, row_bytes)) in mats.iter().enumerate() {
                let per = n.div_ceil(threads).next_multiple_of(SHARE_ALIGN);
                let share = (i * per).min(n)..((i + 1) * per).min(n);
                let count = (share.len() * row_bytes / PIECE_BYTES).clamp(PIECES, MAX_PIECES);
                let step = share.len().div_ceil(count).next_multiple_of(SHARE_ALIGN).max(SHARE_ALIGN);
                let mut at = share.start;
                while at < share.end {
                    pieces.push((m, at..(at + step).min(share.end)));
                    at += step;
                }
            }
            pieces
        })
        .collect()
}

/// The bytes of one of `w`'s rows (the first layer's matrices stand for
/// every layer's when the pieces are cut: the layers are alike).
fn row_bytes(w: &crate::quant::QMatrix) -> usize {
    w.ty().row_bytes(w.cols()).unwrap_or(0)
}

/// Most pieces a thread's share of the attention phase is cut into.
const ATTENTION_PIECES: usize = 8;

/// Each thread's query heads for the attention phase: an even, contiguous
/// split of the `heads` query heads (not of the KV heads: the default model's
/// 3 KV heads on 2 threads left one thread idle for a third of the phase; its
/// 9 query heads split 4 and 5). A piece is the query heads of one KV head
/// within the share, or a few whole such runs (at most [`ATTENTION_PIECES`]
/// pieces), so heads that share a KV head on one thread still read its K/V
/// rows together. A query head's output is computed alone whatever else its
/// call holds, so the bits do not depend on the split.
fn split_query_heads(heads: usize, group: usize, threads: usize) -> Vec<Vec<Piece>> {
    let group = group.max(1);
    (0..threads)
        .map(|i| {
            let share = heads * i / threads..heads * (i + 1) / threads;
            let most = share.len().div_ceil(ATTENTION_PIECES);
            let next_group = |h: usize| ((h / group + 1) * group).min(share.end);
            let mut pieces = Vec::new();
            let mut at = share.start;
            while at < share.end {
                let mut end = next_group(at);
                while end < share.end && next_group(end) - at <= most {
                    end = next_group(end);
                }
                pieces.push((0, at..end));
                at = end;
            }
            pieces
        })
        .collect()
}

/// One step's team run: what every thread reads.
struct Step<'a> {
    shard: &'a CpuShard,
    seq: &'a AttnSeq<'a>,
    /// Where the new position's rows go, per KV head (the same in every layer).
    offs: &'a [usize],
    layers: &'a [KvPtrs],
    rope_cache: &'a [f32],
    block_size: usize,
    bufs: Bufs,
    /// Each phase kind's pieces, per thread (see [`Kind::index`]).
    pieces: [Vec<Vec<Piece>>; KINDS],
    phases: usize,
    slots: Vec<Slot>,
    /// Which of each thread's pieces of each phase are taken: bit j of
    /// `taken[phase * threads + i]` is thread i's piece j.
    taken: Vec<Line>,
    /// The open phase (== phases once the step is done).
    open: Line,
    threads: usize,
    sleeping: Line,
    handles: Vec<std::sync::OnceLock<std::thread::Thread>>,
    start: Instant,
}

thread_local! {
    /// Each thread's quantized input of the matmuls it runs pieces of: every
    /// thread quantizes the phase's input itself, so the kernels read it from
    /// their own core's cache (and nothing is allocated once it has grown).
    static PREP: std::cell::RefCell<Prepared> = std::cell::RefCell::new(Prepared::default());
}

impl CpuShard {
    /// Whether a step can run on the team: one sequence, one token, one
    /// worker, several threads, head rows that start on the kernels' row groups.
    pub(super) fn team_fits(&self, input: &super::ModelInput) -> bool {
        enabled()
            && self.world == 1
            && input.tokens.len() == 1
            && input.seqs.len() == 1
            && self.cfg.head_dim.is_multiple_of(SHARE_ALIGN)
            && rayon::current_num_threads() > 1
            && !super::dump::enabled()
    }

    /// The one-token forward pass on the team (see the module docs): the
    /// logits of the token when its chunk asks for them (else none). Call from
    /// inside the pool, with a batch that [`Self::team_fits`] and `check_batch` passed.
    pub(super) fn forward_team(&self, input: &super::ModelInput, seq: &AttnSeq, kv: &mut KvStore) -> Vec<f32> {
        let cfg = &self.cfg;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let t = profile::start();
        let (qd, kvd, ff) = (self.n_heads * hd, self.n_kv_heads * hd, self.layers.first().map_or(0, |l| l.w_up.rows()));
        let (mut x, mut xn) = (vec![0.0f32; h], vec![0.0f32; h]);
        let (mut q, mut k, mut v) = (vec![0.0f32; qd], vec![0.0f32; kvd], vec![0.0f32; kvd]);
        let (mut attn, mut proj) = (vec![0.0f32; qd], vec![0.0f32; h]);
        let (mut gate, mut up) = (vec![0.0f32; ff], vec![0.0f32; ff]);
        let m = input.seqs[0].logits.count(1);
        let mut logits = vec![0.0f32; m * self.lm_head.rows()];
        let mut rope_cache = vec![0.0f32; hd];
        self.embed.dequantize_row(input.tokens[0] as usize, &mut x);
        profile::add(Part::Buffers, t, 1);
        let t = profile::start();
        ops::rope_cache(seq.start_pos, self.rope_theta_scale, cfg.rope_freq_factors.as_deref(), &mut rope_cache);
        profile::add(Part::Rope, t, 1);
        let offs: Vec<usize> =
            (0..self.n_kv_heads).map(|kvh| kv.head_offset(seq.block_table, seq.start_pos, kvh).expect("checked in check_batch")).collect();
        let layers: Vec<KvPtrs> =
            kv.k.iter_mut().zip(kv.v.iter_mut()).map(|(k, v)| KvPtrs { k: k.as_mut_ptr(), v: v.as_mut_ptr(), len: k.len().min(v.len()) }).collect();
        let threads = rayon::current_num_threads();
        let first = &self.layers[0];
        let t = profile::start();
        ops::rms_norm(&x, &first.attn_norm, cfg.rms_norm_eps, &mut xn);
        profile::add(Part::Norm, t, 1);
        let phases = self.layers.len() * PER_LAYER + usize::from(m > 0);
        let step = Step {
            shard: self,
            seq,
            offs: &offs,
            layers: &layers,
            rope_cache: &rope_cache,
            block_size: kv.block_size,
            bufs: Bufs {
                x: Shared::new(&mut x),
                xn: Shared::new(&mut xn),
                q: Shared::new(&mut q),
                k: Shared::new(&mut k),
                v: Shared::new(&mut v),
                attn: Shared::new(&mut attn),
                proj: Shared::new(&mut proj),
                gate: Shared::new(&mut gate),
                up: Shared::new(&mut up),
                logits: Shared::new(&mut logits),
            },
            pieces: [
                split(&[(qd, row_bytes(&first.wq)), (kvd, row_bytes(&first.wk)), (kvd, row_bytes(&first.wv))], threads),
                split_query_heads(self.n_heads, self.n_heads / self.n_kv_heads, threads),
                split(&[(first.wo.rows(), row_bytes(&first.wo))], threads),
                split(&[(ff, row_bytes(&first.w_gate) + row_bytes(&first.w_up))], threads),
                split(&[(first.w_down.rows(), row_bytes(&first.w_down))], threads),
                split(&[(self.lm_head.rows(), row_bytes(&self.lm_head))], threads),
            ],
            phases,
            slots: (0..phases).map(|_| Slot::default()).collect(),
            taken: (0..phases * threads).map(|_| Line::default()).collect(),
            open: Line::default(),
            threads,
            sleeping: Line::default(),
            handles: (0..threads).map(|_| std::sync::OnceLock::new()).collect(),
            start: Instant::now(),
        };
        // The calling thread is thread 0; the others join as the pool takes
        // their jobs. A thread that is not running does not hold the step up:
        // the calling thread takes its share, and once done runs its job
        // itself (which finds nothing left) if no one else has.
        rayon::scope(|s| {
            for me in 1..threads {
                let step = &step;
                s.spawn(move |_| step.run(me));
            }
            step.run(0);
        });
        logits
    }
}

impl Step<'_> {
    fn kind(&self, phase: usize) -> (usize, Kind) {
        let li = phase / PER_LAYER;
        if li == self.shard.layers.len() {
            return (li, Kind::LmHead);
        }
        let kind = match phase % PER_LAYER {
            0 => Kind::Qkv,
            1 => Kind::Attention,
            2 => Kind::Out,
            3 => Kind::GateUp,
            _ => Kind::Down,
        };
        (li, kind)
    }

    /// Claims piece `j` of thread `of`'s share of `phase`: whether this thread got it.
    fn claim(&self, phase: usize, of: usize, j: usize) -> bool {
        let bit = 1usize << j;
        self.taken[phase * self.threads + of].0.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Thread `me`'s part: claim pieces of each open phase until the step is
    /// done. Should it panic, the step is declared done first, so the other
    /// threads stop waiting for it (the panic then reaches the caller).
    fn run(&self, me: usize) {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_phases(me))) {
            self.open_phase(self.phases);
            std::panic::resume_unwind(e);
        }
    }

    fn run_phases(&self, me: usize) {
        PREP.with(|p| self.run_phases_with(me, &mut p.borrow_mut()));
    }

    fn run_phases_with(&self, me: usize, prep: &mut Prepared) {
        if let Some(h) = self.handles.get(me) {
            h.get_or_init(std::thread::current);
        }
        let mut phase = 0;
        loop {
            phase = self.wait_open(phase);
            if phase >= self.phases {
                return;
            }
            let (li, kind) = self.kind(phase);
            let pieces = &self.pieces[kind.index()];
            let total: usize = pieces.iter().map(Vec::len).sum();
            // Its own pieces first, in order; then the others', from their ends.
            let mut done = 0;
            for d in 0..self.threads {
                let of = (me + d) % self.threads;
                let mine = &pieces[of];
                for k in 0..mine.len() {
                    let j = if d == 0 { k } else { mine.len() - 1 - k };
                    if self.claim(phase, of, j) {
                        if done == 0 {
                            self.prepare(li, kind, prep);
                        }
                        self.piece(li, kind, &mine[j], prep);
                        done += 1;
                    }
                }
            }
            // The thread whose pieces complete the phase (a thread that got
            // none, arriving after the last, must not count as completing it)
            // runs what comes before the next one, then opens it.
            if done > 0 && self.slots[phase].done.fetch_add(done, Ordering::AcqRel) + done == total {
                self.phase_wall(phase, kind);
                self.serial(li, kind);
                self.open_phase(phase + 1);
            }
            phase += 1;
        }
    }

    /// The phase's wall time, from its opening to its last chunk (profile only).
    fn phase_wall(&self, phase: usize, kind: Kind) {
        if !profile::enabled() {
            return;
        }
        let opened = self.start + Duration::from_nanos(self.slots[phase].opened.load(Ordering::Relaxed));
        let wall = match kind {
            Kind::Attention => Part::AttentionWall,
            Kind::LmHead => Part::LmHeadWall,
            _ => Part::MatmulWall,
        };
        profile::add(wall, Some(opened), 1);
    }

    /// Waits until phase `phase` (or a later one) is open; returns the open one.
    fn wait_open(&self, phase: usize) -> usize {
        let open = || self.open.0.load(Ordering::Acquire);
        let now = open();
        if now >= phase {
            return now;
        }
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            std::hint::spin_loop();
            spins += 1;
            let now = open();
            if now >= phase {
                return now;
            }
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                break;
            }
        }
        // Dekker with `open_phase`: either it sees this thread counted, or
        // this sees the phase open.
        self.sleeping.0.fetch_add(1, Ordering::SeqCst);
        let mut now = self.open.0.load(Ordering::SeqCst);
        while now < phase {
            std::thread::park();
            now = self.open.0.load(Ordering::SeqCst);
        }
        self.sleeping.0.fetch_sub(1, Ordering::SeqCst);
        now
    }

    /// Opens `phase` (after its inputs are written), waking sleeping threads.
    fn open_phase(&self, phase: usize) {
        if profile::enabled() {
            if let Some(slot) = self.slots.get(phase) {
                let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                slot.opened.store(ns, Ordering::Relaxed);
            }
        }
        self.open.0.store(phase, Ordering::SeqCst);
        if self.sleeping.0.load(Ordering::SeqCst) > 0 {
            for h in self.handles.iter().filter_map(std::sync::OnceLock::get) {
                h.unpark();
            }
        }
    }

    /// Quantizes the input of layer `li`'s phase `kind` into `prep`, for its
    /// matrices (nothing for attention).
    fn prepare(&self, li: usize, kind: Kind, prep: &mut Prepared) {
        let sh = self.shard;
        let b = &self.bufs;
        let t = profile::start();
        // SAFETY: the phase's input was written before it opened, and nothing
        // writes it until it ends.
        unsafe {
            match kind {
                Kind::Qkv => prep.prepare(b.xn.all(), &[&sh.layers[li].wq, &sh.layers[li].wk, &sh.layers[li].wv]),
                Kind::Attention => return,
                Kind::Out => prep.prepare(b.attn.all(), &[&sh.layers[li].wo]),
                Kind::GateUp => prep.prepare(b.xn.all(), &[&sh.layers[li].w_gate, &sh.layers[li].w_up]),
                Kind::Down => prep.prepare(b.gate.all(), &[&sh.layers[li].w_down]),
                Kind::LmHead => prep.prepare(b.xn.all(), &[&sh.lm_head]),
            }
        }
        profile::add(Part::TeamQuantize, t, self.threads);
    }

    /// Piece `(i, rows)` of layer `li`'s phase `kind`, its input in `prep`.
    fn piece(&self, li: usize, kind: Kind, (i, rows): &Piece, prep: &Prepared) {
        let (i, rows) = (*i, rows.clone());
        let sh = self.shard;
        let b = &self.bufs;
        let busy = match kind {
            Kind::Attention => Part::AttentionBusy,
            Kind::LmHead => Part::LmHeadBusy,
            _ => Part::MatmulBusy,
        };
        let t = profile::start();
        // Below, a piece writes only its own rows (the pieces of a phase are
        // disjoint) and reads buffers that only earlier phases or serial
        // pieces wrote; `Prepared::run` is given each buffer's start and the
        // matrix's shape, as it requires.
        match kind {
            Kind::Qkv => {
                let l = &sh.layers[li];
                let (w, out) = match i {
                    0 => (&l.wq, b.q.ptr),
                    1 => (&l.wk, b.k.ptr),
                    _ => (&l.wv, b.v.ptr),
                };
                // SAFETY: xn is the phase's input; rows `rows` of q, k or v are this piece's.
                unsafe { prep.run(i, w, b.xn.all(), rows, out) };
            }
            Kind::Attention => {
                let hd = sh.cfg.head_dim;
                let group = sh.n_heads / sh.n_kv_heads;
                let kvp = self.layers[li];
                // SAFETY: the layer's K/V arrays (this position's rows were
                // written before the phase opened) and q are written by no
                // one during the phase.
                let (kl, vl, q) =
                    unsafe { (std::slice::from_raw_parts(kvp.k.cast_const(), kvp.len), std::slice::from_raw_parts(kvp.v.cast_const(), kvp.len), b.q.all()) };
                let layer = KvLayer { k: kl, v: vl, head_dim: hd, n_kv: sh.n_kv_heads, block_size: self.block_size };
                // The piece's query heads, a KV head's run of them at a time.
                let mut h = rows.start;
                while h < rows.end {
                    let kvh = h / group;
                    let end = ((kvh + 1) * group).min(rows.end);
                    let r = h * hd..end * hd;
                    // SAFETY: these query heads' outputs are this piece's alone.
                    let o = unsafe { b.attn.part(r.clone()) };
                    attend_unit(layer, self.seq, self.seq.start_pos, kvh, &q[r], o);
                    h = end;
                }
            }
            Kind::Out => {
                let l = &sh.layers[li];
                // SAFETY: attn is the phase's input; rows `rows` of proj are this piece's.
                unsafe { prep.run(0, &l.wo, b.attn.all(), rows, b.proj.ptr) };
            }
            Kind::GateUp => {
                let l = &sh.layers[li];
                // SAFETY: xn is the phase's input; rows `rows` of gate and up are this piece's.
                unsafe {
                    prep.run(0, &l.w_gate, b.xn.all(), rows.clone(), b.gate.ptr);
                    prep.run(1, &l.w_up, b.xn.all(), rows.clone(), b.up.ptr);
                }
                profile::add(busy, t, self.threads);
                let t = profile::start();
                // SAFETY: as above, this piece's rows of gate and up.
                unsafe { ops::silu_mul(b.gate.part(rows.clone()), b.up.part(rows)) };
                profile::add(Part::SwigluBusy, t, self.threads);
                return;
            }
            Kind::Down => {
                let l = &sh.layers[li];
                // SAFETY: gate is the phase's input; rows `rows` of proj are this piece's.
                unsafe { prep.run(0, &l.w_down, b.gate.all(), rows, b.proj.ptr) };
            }
            // SAFETY: xn is the phase's input; rows `rows` of the logits are this piece's.
            Kind::LmHead => unsafe { prep.run(0, &sh.lm_head, b.xn.all(), rows, b.logits.ptr) },
        }
        profile::add(busy, t, self.threads);
    }

    /// What runs on one thread between layer `li`'s phase `kind` and the next
    /// phase, as `CpuShard::forward` runs it between its parallel regions.
    fn serial(&self, li: usize, kind: Kind) {
        let sh = self.shard;
        let cfg = &sh.cfg;
        let (hd, eps) = (cfg.head_dim, cfg.rms_norm_eps);
        let b = &self.bufs;
        // Below, the phase before is complete and the next is not open, so
        // this thread has every buffer to itself.
        match kind {
            Kind::Qkv => {
                let l = &sh.layers[li];
                // SAFETY: between phases: this thread's alone.
                let (q, k, v) = unsafe { (b.q.all_mut(), b.k.all_mut(), b.v.all_mut()) };
                let t = profile::start();
                for (bias, buf) in [(&l.bq, &mut *q), (&l.bk, &mut *k), (&l.bv, &mut *v)] {
                    if let Some(bias) = bias {
                        ops::add_bias(buf, bias);
                    }
                }
                profile::add(Part::Residual, t, 1);
                let t = profile::start();
                ops::rope(q, hd, self.rope_cache, cfg.rope_style);
                ops::rope(k, hd, self.rope_cache, cfg.rope_style);
                profile::add(Part::Rope, t, 1);
                let t = profile::start();
                let kvp = self.layers[li];
                for (kvh, &off) in self.offs.iter().enumerate() {
                    assert!(off + hd <= kvp.len, "KV offset out of the layer");
                    let src = kvh * hd..(kvh + 1) * hd;
                    // SAFETY: in bounds (asserted); no attention of this layer runs yet.
                    unsafe {
                        std::slice::from_raw_parts_mut(kvp.k.add(off), hd).convert_from_f32_slice(&k[src.clone()]);
                        std::slice::from_raw_parts_mut(kvp.v.add(off), hd).convert_from_f32_slice(&v[src]);
                    }
                }
                profile::add(Part::KvWrite, t, 1);
            }
            Kind::Attention | Kind::GateUp | Kind::LmHead => {}
            Kind::Out => {
                let l = &sh.layers[li];
                // SAFETY: between phases: this thread's alone.
                let (x, xn, proj) = unsafe { (b.x.all_mut(), b.xn.all_mut(), b.proj.all()) };
                let t = profile::start();
                ops::add_assign(x, proj);
                profile::add(Part::Residual, t, 1);
                let t = profile::start();
                ops::rms_norm(x, &l.ffn_norm, eps, xn);
                profile::add(Part::Norm, t, 1);
            }
            Kind::Down => {
                // SAFETY: between phases: this thread's alone.
                let (x, xn, proj) = unsafe { (b.x.all_mut(), b.xn.all_mut(), b.proj.all()) };
                let t = profile::start();
                ops::add_assign(x, proj);
                profile::add(Part::Residual, t, 1);
                let next = sh.layers.get(li + 1);
                if next.is_none() && b.logits.len == 0 {
                    return;
                }
                let t = profile::start();
                ops::rms_norm(x, next.map_or(&sh.norm, |l| &l.attn_norm), eps, xn);
                profile::add(Part::Norm, t, 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_every_row_once_from_row_groups() {
        // (rows, bytes a row): small shares (4 pieces each) and large ones (up to 16).
        for (mats, threads) in [
            (vec![(576, 360), (192, 360), (192, 360)], 2),
            (vec![(1536, 360)], 3),
            (vec![(49152, 612)], 2),
            (vec![(128_256, 1152)], 2),
            (vec![(2048, 1152), (512, 1152), (512, 1152)], 2),
            (vec![(8, 100)], 2),
            (vec![(17, 5000), (40, 5000)], 4),
            (vec![(0, 100)], 2),
        ] {
            let rows: Vec<usize> = mats.iter().map(|m| m.0).collect();
            let split = split(&mats, threads);
            assert_eq!(split.len(), threads);
            for (m, &n) in rows.iter().enumerate() {
                let mut got: Vec<Range<usize>> = split.iter().flatten().filter(|p| p.0 == m).map(|p| p.1.clone()).collect();
                got.sort_by_key(|r| r.start);
                assert_eq!(got.first().map_or(0, |r| r.start), 0);
                assert_eq!(got.last().map_or(0, |r| r.end), n);
                for w in got.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                assert!(got.iter().all(|r| r.start.is_multiple_of(SHARE_ALIGN) && !r.is_empty()), "{rows:?}: {got:?}");
            }
            assert!(split.iter().all(|s| s.len() <= MAX_PIECES * rows.len() && s.len() <= usize::BITS as usize));
        }
        // A large share is cut finer than a small one.
        assert_eq!(split(&[(128_256, 1152)], 2)[0].len(), MAX_PIECES);
        assert_eq!(split(&[(576, 360)], 2)[0].len(), PIECES);
    }

    #[test]
    fn attention_pieces_split_query_heads_evenly_at_kv_heads() {
        // The default model: 9 query heads on 3 KV heads.
        assert_eq!(split_query_heads(9, 3, 2), vec![vec![(0, 0..3), (0, 3..4)], vec![(0, 4..6), (0, 6..9)]]);
        for (heads, group, threads) in [(9, 3, 2), (9, 3, 5), (32, 4, 2), (32, 1, 2), (128, 2, 1), (128, 1, 3), (14, 7, 4), (8, 8, 2), (3, 1, 4)] {
            let split = split_query_heads(heads, group, threads);
            let mut got: Vec<Range<usize>> = split.iter().flatten().map(|p| p.1.clone()).collect();
            got.sort_by_key(|r| r.start);
            assert_eq!(got.first().map_or(0, |r| r.start), 0);
            assert_eq!(got.last().map_or(heads, |r| r.end), heads);
            for w in got.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            assert!(got.iter().all(|r| !r.is_empty()));
            for (i, share) in split.iter().enumerate() {
                let n: usize = share.iter().map(|p| p.1.len()).sum();
                assert!(n == heads / threads || n == heads.div_ceil(threads), "{heads}/{threads}: thread {i} has {n}");
                assert!(share.len() <= ATTENTION_PIECES + 2, "{heads}, {group}, {threads}: {share:?}");
            }
        }
    }
}
