//! The batched matmul the model runs, over the weight view (`quant::QMatrix`).
//!
//! matmul quantizes the activations of all tokens once, then splits the weight
//! rows into chunks over rayon's global pool. Inside a chunk each group of rows
//! is dotted against every token while it is hot in L1, so the weights stream
//! from memory once per call whatever the token count; tokens are taken in tiles
//! of `TOKEN_TILE` so a prefill's activations stay in L1 too.
//!
//! Call it from inside the rayon pool (`ThreadPool::install`, or from a rayon
//! worker): the calling thread then takes part and no job crosses threads per
//! call, which measured ~1.3x faster single-stream decode than calling from an
//! outside thread.

#![allow(clippy::needless_range_loop, reason = "kernels index several same-length arrays by one counter; iterators would obscure them")]

use super::act::{act_kind, ActKind, ActRow, Acts};
use super::dot_scalar;
use super::simd::{self, Isa};
use crate::cpu::profile::{self, Part};
use crate::quant::{check_row, GgmlType, QMatrix, QuantError};
use rayon::prelude::*;
use std::cell::Cell;
use std::ops::Range;
use std::sync::Arc;

/// Tokens per tile: a tile's quantized activations (16 x cols bytes) stay in
/// L1 while each group of weight rows is dotted against all of them; the chunk's
/// weight rows (<= 256) stay in L2 across tiles. 16 beat 64 by ~1.5x at 64 tokens.
const TOKEN_TILE: usize = 16;
/// Below this many multiply-adds a matmul runs on the calling thread: waking
/// the pool costs more than it saves.
const PAR_MIN_MACS: usize = 1 << 17;

thread_local! {
    /// Reused activation buffers (taken out while in use, so a nested call on
    /// the same thread, e.g. from rayon work stealing, just makes its own).
    static SCRATCH: Cell<Vec<Acts>> = const { Cell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Reused token-group buffers of gemm8k and gemm8, one per activation form (as SCRATCH).
    static SCRATCH8: Cell<Vec<super::gemm8k::Tokens8>> = const { Cell::new(Vec::new()) };
}

/// Where a tile's activations come from.
struct ActSrc<'a> {
    q: Option<&'a Acts>,
    x: &'a [f32],
    cols: usize,
    /// The activations regrouped for gemm8k or gemm8, when one takes the matrix.
    #[cfg(target_arch = "x86_64")]
    t8: Option<&'a super::gemm8k::Tokens8>,
}

impl ActSrc<'_> {
    fn row(&self, t: usize) -> ActRow<'_> {
        match self.q {
            Some(q) => q.row(t),
            None => ActRow::float(&self.x[t * self.cols..(t + 1) * self.cols]),
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn ptrs(&self) -> super::dot_x86::ActPtrs {
        let (qs, d, s, bsums, ysum, nb) = match self.q {
            Some(q) => (q.qs.as_ptr(), q.d.as_ptr(), q.s.as_ptr(), q.bsums.as_ptr(), q.neg_sums.as_ptr(), q.nb()),
            None => (std::ptr::null(), std::ptr::null(), std::ptr::null(), std::ptr::null(), std::ptr::null(), 0),
        };
        super::dot_x86::ActPtrs { qs, d, s, bsums, ysum, f: self.x.as_ptr(), cols: self.cols, nb }
    }
}

/// Output pointer shared by the chunk tasks; each writes only its own rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: an OutPtr points into an output slice that `matmul_parts` borrows
// mutably for the whole parallel region, so the memory outlives every task
// that gets the pointer; the tasks write disjoint row ranges of it, so
// handing the pointer to another thread creates no data race.
unsafe impl Send for OutPtr {}
// SAFETY: shared references to an OutPtr only copy the pointer out; all writes
// through it go to the task's own disjoint rows (see `Send` above).
unsafe impl Sync for OutPtr {}

/// out[t * w.rows() + r] = sum_k w[r, k] * x[t * w.cols() + k] for t in 0..n_tokens.
///
/// # Panics
/// If `x.len() != n_tokens * w.cols()` or `out.len() != n_tokens * w.rows()`
/// (caller bugs: the shapes come from the model's own configuration).
pub fn matmul(w: &QMatrix, x: &[f32], n_tokens: usize, out: &mut [f32]) {
    matmul_group_isa(x, n_tokens, &mut [(w, out)], simd::current());
}

/// [`matmul`] for several matrices that read the same input (q/k/v, gate/up):
/// the input is quantized once per activation type and all the matrices' rows
/// are shared out in one parallel region, so the threads meet once, not once
/// per matrix.
///
/// # Panics
/// As [`matmul`], for each (matrix, output) pair.
pub fn matmul_group(x: &[f32], n_tokens: usize, parts: &mut [(&QMatrix, &mut [f32])]) {
    matmul_group_isa(x, n_tokens, parts, simd::current());
}

/// An element-wise step that joins two matmuls' outputs: `a = f(a, b)`.
pub(super) type Combine = dyn Fn(&mut [f32], &[f32]) + Sync;

/// Two matmuls of one input with the same number of rows (gate and up), their
/// outputs then joined element-wise into the first (`combine`, e.g. SwiGLU):
/// each parallel task computes the same rows of both and joins them while they
/// are hot, so the join is shared out with the matmuls instead of running on
/// one thread after them.
///
/// # Panics
/// As [`matmul`], for each pair, or if the matrices' row counts differ.
pub fn matmul_gated(x: &[f32], n_tokens: usize, a: (&QMatrix, &mut [f32]), b: (&QMatrix, &mut [f32]), combine: &Combine) {
    assert_eq!(a.0.rows(), b.0.rows(), "matmul_gated: the two matrices' rows differ");
    matmul_parts(x, n_tokens, &mut [a, b], simd::current(), Some(combine));
}

#[cfg(test)]
pub(crate) fn matmul_isa(w: &QMatrix, x: &[f32], n_tokens: usize, out: &mut [f32], isa: Isa) {
    matmul_group_isa(x, n_tokens, &mut [(w, out)], isa);
}

/// How one matrix of a group reads its input.
#[derive(Clone, Copy, PartialEq, Eq)]
struct ActNeed {
    kind: ActKind,
    /// gemm16's unsigned bias, when it takes the matrix and the bias is not 0.
    bias: Option<i32>,
}

/// Which batched kernel takes a matrix's whole groups, before the per-row
/// tiles take what is left.
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, reason = "the batched kernels are x86-64 only"))]
enum Batched {
    /// Only the per-row tiles.
    No,
    /// gemm16 or gemm16k (AVX512-VNNI): whole groups of 16 rows, every token.
    Rows16,
    /// gemm8k (the super-block types) or gemm8 (the 32-element ones), on
    /// AVX2: every row, the tokens of `taken8`.
    Tokens8,
}

/// Gives `w` its copy in gemm16's layout (`interleave.rs`) where gemm16 will
/// multiply it on this CPU (AVX512-VNNI, a type the copy takes, rows gemm16
/// can address). `FERRY_INTERLEAVE=0` leaves every matrix without one (to compare).
pub fn interleave_for_this_cpu(w: &mut QMatrix) {
    #[cfg(target_arch = "x86_64")]
    {
        let off = std::env::var("FERRY_INTERLEAVE").is_ok_and(|v| v.trim() == "0");
        if off || simd::detected() != Isa::Avx512Vnni || !super::gemm16::stride_ok(w.row_stride()) {
            return;
        }
        if let Some(copy) = super::interleave::interleave(w) {
            w.set_interleaved(copy);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = w;
}

pub(crate) fn matmul_group_isa(x: &[f32], n_tokens: usize, parts: &mut [(&QMatrix, &mut [f32])], isa: Isa) {
    matmul_parts(x, n_tokens, parts, isa, None);
}

/// The matmuls of `parts`, all of input `x`; with `combine`, `parts` is two
/// matrices of equal rows and each task also joins its rows (see [`matmul_gated`]).
fn matmul_parts(x: &[f32], n_tokens: usize, parts: &mut [(&QMatrix, &mut [f32])], isa: Isa, combine: Option<&Combine>) {
    for (w, out) in parts.iter() {
        assert_eq!(x.len(), n_tokens * w.cols(), "matmul: x has {} values for {n_tokens} tokens of {} columns", x.len(), w.cols());
        assert_eq!(out.len(), n_tokens * w.rows(), "matmul: out has {} values for {n_tokens} tokens of {} rows", out.len(), w.rows());
    }
    if n_tokens == 0 || parts.is_empty() {
        return;
    }
    for (w, out) in parts.iter_mut() {
        if w.cols() == 0 {
            out.fill(0.0);
        }
    }
    let (mut needs, mut which, mut wide) = (Vec::new(), Vec::new(), Vec::new());
    plan_acts(parts.iter().map(|(w, _)| &**w), n_tokens, isa, &mut needs, &mut which, &mut wide);
    let cols = parts[0].0.cols();
    let t = profile::start();
    let mut acts = SCRATCH.with(std::cell::Cell::take);
    quantize_acts(x, cols, n_tokens, isa, &needs, &mut acts);
    // gemm8k's or gemm8's token groups, for each activation form a matrix
    // one of them takes reads (Q8_K for gemm8k, Q8_0 / Q8_1 for gemm8).
    #[cfg(target_arch = "x86_64")]
    let mut t8s = SCRATCH8.with(std::cell::Cell::take);
    #[cfg(target_arch = "x86_64")]
    {
        t8s.resize_with(t8s.len().max(needs.len()), Default::default);
        for (i, (a, t8)) in acts.iter().zip(t8s.iter_mut()).enumerate().take(needs.len()) {
            // Matrices of different types can share an activation form (Q8_0
            // serves Q4_0, Q5_0 and Q8_0) and take different token counts
            // (gemm8's thresholds differ by type): fill as many as the most
            // any of them takes.
            let users = (0..which.len()).filter(|&k| which[k] == Some(i) && wide[k] == Batched::Tokens8);
            let (mut ty, mut n8) = (None, 0);
            for k in users {
                let t = parts[k].0.ty();
                ty = Some(t);
                n8 = n8.max(taken8(t, n_tokens));
            }
            if let (Some(ty), true) = (ty, cols > 0) {
                let src = ActSrc { q: Some(a), x, cols, t8: None };
                // SAFETY: Tokens8 is only chosen where AVX2 was detected (a
                // non-scalar Isa), for a type of gemm8k (Q8_K activations)
                // or gemm8 (Q8_0 / Q8_1) and n_tokens tokens; one form's
                // users are all gemm8k's or all gemm8's.
                unsafe {
                    if super::gemm8k::supports(ty) {
                        t8.fill(&src.ptrs(), n8);
                    } else {
                        t8.fill_b32(&src.ptrs(), n8);
                    }
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    let t8_of = |k: usize| which[k].filter(|_| wide[k] == Batched::Tokens8 && cols > 0).map(|i| &t8s[i]);
    let srcs: Vec<ActSrc> = (0..which.len())
        .map(|k| ActSrc {
            q: which[k].map(|i| &acts[i]),
            x,
            cols,
            #[cfg(target_arch = "x86_64")]
            t8: t8_of(k),
        })
        .collect();
    let optrs: Vec<OutPtr> = parts.iter_mut().map(|(_, out)| OutPtr(out.as_mut_ptr())).collect();
    profile::add(Part::QuantizeActs, t, 1);

    // The row chunks of every matrix, one task each; with `combine`, one task
    // per chunk of both matrices' rows.
    let threads = rayon::current_num_threads();
    let macs: usize = parts.iter().map(|(w, _)| w.rows() * w.cols() * n_tokens).sum();
    let serial = threads <= 1 || macs < PAR_MIN_MACS;
    let mut tasks: Vec<(usize, Range<usize>)> = Vec::new();
    let align = if wide.contains(&Batched::Rows16) { 16 } else { 4 };
    for (i, (w, _)) in parts.iter().enumerate() {
        if w.rows() == 0 || w.cols() == 0 || (combine.is_some() && i > 0) {
            continue;
        }
        let chunk = if serial { w.rows() } else { chunk_rows(w.rows(), threads, if wide[i] == Batched::Rows16 { 16 } else { align }) };
        tasks.extend((0..w.rows().div_ceil(chunk)).map(|c| (i, c * chunk..((c + 1) * chunk).min(w.rows()))));
    }
    // Profile: each task's busy time counts as its share of the pool's time.
    let ((busy_part, wall_part), share) = (profile::matmul_parts(), if serial { 1 } else { threads });
    let run = |(i, rows): &(usize, Range<usize>)| {
        let busy = profile::start();
        let one = |i: usize| {
            // SAFETY: tasks are disjoint row ranges of their matrix, so no output
            // is written twice; each output has n_tokens * rows values (asserted).
            unsafe { run_rows(parts[i].0, &srcs[i], isa, rows.clone(), n_tokens, optrs[i], wide[i]) };
        };
        one(*i);
        let Some(combine) = combine else {
            profile::add(busy_part, busy, share);
            return;
        };
        one(1);
        profile::add(busy_part, busy, share);
        let joining = profile::start();
        let n_rows = parts[0].0.rows();
        for t in 0..n_tokens {
            let at = t * n_rows + rows.start;
            // SAFETY: these rows of token t were written by this task alone
            // (above) and are read or written by no other task.
            let (a, b) = unsafe {
                (
                    std::slice::from_raw_parts_mut(optrs[0].0.add(at), rows.len()),
                    std::slice::from_raw_parts(optrs[1].0.add(at) as *const f32, rows.len()),
                )
            };
            combine(a, b);
        }
        profile::add(Part::SwigluBusy, joining, share);
    };
    let wall = profile::start();
    if serial {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().for_each(run);
    }
    profile::add(wall_part, wall, 1);
    if let (Some(combine), [(wa, a), (_, b)]) = (combine, &mut *parts) {
        if wa.rows() > 0 && wa.cols() == 0 {
            // No tasks ran: the outputs are the zeros filled above, still to be joined.
            combine(a, b);
        }
    }
    drop(srcs);
    #[cfg(target_arch = "x86_64")]
    SCRATCH8.with(|c| c.set(t8s));
    SCRATCH.with(|c| c.set(acts));
}

/// Each matrix's activation form (`which` indexes `needs`, None: it reads
/// the f32 input) and whether the 16-row kernel takes it (`wide`); each
/// distinct form is quantized once.
fn plan_acts<'a>(
    mats: impl Iterator<Item = &'a QMatrix>,
    n_tokens: usize,
    isa: Isa,
    needs: &mut Vec<ActNeed>,
    which: &mut Vec<Option<usize>>,
    wide: &mut Vec<Batched>,
) {
    needs.clear();
    which.clear();
    wide.clear();
    for w in mats {
        let wd = batched(w, isa, n_tokens);
        wide.push(wd);
        let kind = act_kind(w.ty());
        if kind == ActKind::F32 {
            which.push(None);
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        let bias = if wd == Batched::Rows16 { super::gemm16::bias(w.ty()).filter(|&b| b != 0) } else { None };
        #[cfg(not(target_arch = "x86_64"))]
        let bias = None;
        let need = ActNeed { kind, bias };
        let i = needs.iter().position(|n| *n == need).unwrap_or_else(|| {
            needs.push(need);
            needs.len() - 1
        });
        which.push(Some(i));
    }
}

/// Quantizes `x` (n_tokens rows of `cols`) once for each form in `needs`, into `acts`.
fn quantize_acts(x: &[f32], cols: usize, n_tokens: usize, isa: Isa, needs: &[ActNeed], acts: &mut Vec<Acts>) {
    acts.resize_with(acts.len().max(needs.len()), Acts::default);
    if cols > 0 {
        for (a, need) in acts.iter_mut().zip(needs) {
            a.quantize(need.kind, x, cols, n_tokens, isa);
            if let Some(bias) = need.bias {
                a.fill_neg_sums(bias);
            }
        }
    }
}

/// One token's input to a set of matrices (q/k/v, gate/up, ...), quantized
/// once, for a thread that runs its own share of their rows ([`Self::run`])
/// with no parallel region: the single-stream decode team
/// (`crate::cpu::team`). Reused from step to step: nothing is allocated
/// once its buffers have grown.
pub(crate) struct Prepared {
    isa: Isa,
    needs: Vec<ActNeed>,
    which: Vec<Option<usize>>,
    wide: Vec<Batched>,
    acts: Vec<Acts>,
}

impl Default for Prepared {
    fn default() -> Self {
        Prepared { isa: Isa::Scalar, needs: Vec::new(), which: Vec::new(), wide: Vec::new(), acts: Vec::new() }
    }
}

impl Prepared {
    /// Quantizes `x` (one token) for the matrices `mats`, all of `x.len()` columns.
    pub(crate) fn prepare(&mut self, x: &[f32], mats: &[&QMatrix]) {
        self.isa = simd::current();
        plan_acts(mats.iter().copied(), 1, self.isa, &mut self.needs, &mut self.which, &mut self.wide);
        quantize_acts(x, x.len(), 1, self.isa, &self.needs, &mut self.acts);
    }

    /// Rows `rows` of matrix `i` of the prepared set, `w`, times the token:
    /// `out[r]` for r in `rows`. The same kernels as [`matmul`] with the same
    /// row grouping, so the same bits, when `rows` starts at a multiple of
    /// [`SHARE_ALIGN`].
    ///
    /// # Panics
    /// If `w` is not shaped like the i-th matrix [`Self::prepare`] was given
    /// (its columns differ from `x`'s), or `rows` is outside it.
    ///
    /// # Safety
    /// `out` must point at `w.rows()` floats, and no other thread may read or
    /// write rows `rows` of them during the call.
    pub(crate) unsafe fn run(&self, i: usize, w: &QMatrix, x: &[f32], rows: Range<usize>, out: *mut f32) {
        assert!(i < self.wide.len() && x.len() == w.cols() && rows.end <= w.rows(), "Prepared::run: shapes differ");
        if rows.is_empty() {
            return;
        }
        if w.cols() == 0 {
            for r in rows {
                // SAFETY: r < w.rows(), and these rows are the caller's alone.
                unsafe { *out.add(r) = 0.0 };
            }
            return;
        }
        let src = ActSrc {
            q: self.which[i].map(|k| &self.acts[k]),
            x,
            cols: w.cols(),
            // One token: gemm8k and gemm8 never take it.
            #[cfg(target_arch = "x86_64")]
            t8: None,
        };
        // SAFETY: the caller gives w.rows() floats for the one token, these
        // rows its alone; `rows` are rows of `w` (asserted).
        unsafe { run_rows(w, &src, self.isa, rows, 1, OutPtr(out), self.wide[i]) };
    }
}

/// Where the decode team's row chunks start: a multiple of the 16-row kernel's
/// group (and of the per-row kernels' 4-row tile), as [`matmul`]'s chunks do,
/// so every row runs the same kernel as there.
pub(crate) const SHARE_ALIGN: usize = 16;

/// Rows per parallel task: several tasks per thread for balance, a multiple of
/// `align` (the kernels' row tile), and small enough that a chunk of rows stays in L2.
fn chunk_rows(rows: usize, threads: usize, align: usize) -> usize {
    let per = rows.div_ceil(threads * 8);
    per.clamp(16, 256).next_multiple_of(align)
}

/// Which batched kernel, if any, takes part of this matmul: a 16-row AVX512
/// kernel (gemm16, or gemm16k for the super-block types), or on AVX2 without
/// AVX512-VNNI an 8-token one (gemm8k for the super-block types, gemm8 for
/// the 32-element ones).
fn batched(w: &QMatrix, isa: Isa, n_tokens: usize) -> Batched {
    #[cfg(target_arch = "x86_64")]
    {
        use super::{gemm16, gemm16k};
        let rows16 = |yes: bool| if yes { Batched::Rows16 } else { Batched::No };
        if simd::per_row_forced() {
            return Batched::No;
        }
        match isa {
            Isa::Scalar => Batched::No,
            Isa::Avx2 | Isa::AvxVnni => {
                if taken8(w.ty(), n_tokens) > 0 {
                    Batched::Tokens8
                } else {
                    Batched::No
                }
            }
            Isa::Avx512Vnni if gemm16k::supports(w.ty()) => {
                rows16(n_tokens >= gemm16k::MIN_TOKENS && gemm16k::stride_ok(w.row_stride()))
            }
            Isa::Avx512Vnni => rows16(n_tokens >= gemm16::MIN_TOKENS && gemm16::bias(w.ty()).is_some() && gemm16::stride_ok(w.row_stride())),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, isa, n_tokens);
        Batched::No
    }
}

/// How many of a matmul's `n` tokens (from token 0) the 8-token AVX2
/// kernel for `ty` takes (0: none, or no such kernel for `ty`).
#[cfg(target_arch = "x86_64")]
fn taken8(ty: GgmlType, n: usize) -> usize {
    use super::{gemm8, gemm8k};
    if gemm8k::supports(ty) {
        gemm8k::taken(n)
    } else if gemm8::supports(ty) {
        gemm8::taken(ty, n)
    } else {
        0
    }
}

/// Computes `rows` x all tokens into `out`.
///
/// # Safety
/// `out` must point at n_tokens * w.rows floats, and no other thread may write
/// these rows meanwhile.
unsafe fn run_rows(w: &QMatrix, src: &ActSrc, isa: Isa, rows: Range<usize>, n_tokens: usize, out: OutPtr, wide: Batched) {
    let mut rows = rows;
    // The first token the per-row tiles take: gemm8k or gemm8 takes those before it.
    #[cfg(target_arch = "x86_64")]
    let t_first = match (wide, src.t8) {
        (Batched::Tokens8, Some(t8)) => {
            let (ty, n8) = (w.ty(), taken8(w.ty(), n_tokens));
            let (p, o) = (w.base_ptr().add(rows.start * w.row_stride()), out.0.add(rows.start));
            // SAFETY: Tokens8 means AVX2 was detected and gemm8k or gemm8
            // supports the type; t8 holds the first n8 tokens in that
            // kernel's layout; the rows exist and out has n_tokens *
            // w.rows() values, these rows written by this task alone.
            if super::gemm8k::supports(ty) {
                super::gemm8k::rows(ty, p, w.row_stride(), rows.len(), t8, n8, o, w.rows());
            } else {
                super::gemm8::rows(ty, p, w.row_stride(), rows.len(), t8, n8, o, w.rows());
            }
            n8
        }
        _ => 0,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let t_first = 0;
    #[cfg(target_arch = "x86_64")]
    if wide == Batched::Rows16 {
        use super::gemm16::{rows16, Src16, ROWS};
        let a = src.ptrs();
        while rows.end - rows.start >= ROWS {
            let r = rows.start;
            // SAFETY: `wide` means AVX512-VNNI was detected and the type and
            // stride suit gemm16; rows r..r+16 exist and out has n_tokens * rows
            // values; a group of the interleaved copy holds those same rows.
            let p = w.base_ptr().add(r * w.row_stride());
            if super::gemm16k::supports(w.ty()) {
                super::gemm16k::rows16(w.ty(), p, w.row_stride(), &a, n_tokens, out.0.add(r), w.rows());
            } else {
                let group = match w.interleaved() {
                    Some(c) if r.is_multiple_of(ROWS) && r / ROWS < c.groups => {
                        Src16::Lines(c.lines.as_ptr().add(r / ROWS * c.group_lines).cast(), c.group_lines)
                    }
                    _ => Src16::Rows(p, w.row_stride()),
                };
                rows16(w.ty(), group, &a, n_tokens, out.0.add(r), w.rows());
            }
            rows.start += ROWS;
        }
    }
    let _ = wide;
    let mut tile = [[0f32; 4]; 4];
    let mut t0 = t_first;
    while t0 < n_tokens {
        let t1 = (t0 + TOKEN_TILE).min(n_tokens);
        let mut r = rows.start;
        while r < rows.end {
            let max_r = max_rows(w.ty(), isa, (t1 - t0).min(4)).min(rows.end - r);
            let nr = if max_r >= 4 { 4 } else if max_r >= 2 { 2 } else { 1 };
            let mut t = t0;
            while t < t1 {
                let nt = (t1 - t).min(4);
                compute_tile(w, src, isa, r, nr, t, nt, &mut tile);
                for (i, row) in tile.iter().enumerate().take(nr) {
                    for (j, v) in row.iter().enumerate().take(nt) {
                        *out.0.add((t + j) * w.rows() + r + i) = *v;
                    }
                }
                t += nt;
            }
            r += nr;
        }
        t0 = t1;
    }
}

fn max_rows(ty: GgmlType, isa: Isa, nt: usize) -> usize {
    match isa {
        Isa::Scalar => 4,
        #[cfg(target_arch = "x86_64")]
        _ => super::dot_x86::max_rows(ty, isa, nt),
        #[cfg(not(target_arch = "x86_64"))]
        _ => {
            let _ = (ty, nt);
            4
        }
    }
}

/// One tile of nr rows from `r` x nt tokens from `t`.
#[allow(clippy::too_many_arguments, reason = "a tile is its matrix, activations, ISA, row range, token range and output; a struct for one call site would only rename them")]
fn compute_tile(w: &QMatrix, src: &ActSrc, isa: Isa, r: usize, nr: usize, t: usize, nt: usize, out: &mut [[f32; 4]; 4]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        let a = src.ptrs();
        // SAFETY: a non-scalar Isa was detected on this CPU; rows r..r+nr exist
        // (bounds checked at construction) and tokens t..t+nt were quantized.
        unsafe {
            let p = w.base_ptr().add(r * w.row_stride());
            super::dot_x86::tile(w.ty(), isa, p, w.row_stride(), nr, &a, t, nt, out);
        }
        return;
    }
    let _ = isa;
    for i in 0..nr {
        let wr = w.row_bytes(r + i);
        for j in 0..nt {
            out[i][j] = dot_scalar::dot(w.ty(), wr, &src.row(t + j), w.cols());
        }
    }
}

/// Dot of one weight row (ggml bytes of `x.len()` elements of `ty`) with `x`,
/// computed as matmul does (activations quantized to the vec_dot_type).
pub fn vec_dot(ty: GgmlType, w_row: &[u8], x: &[f32]) -> Result<f32, QuantError> {
    check_row(ty, w_row.len(), x.len())?;
    let w = QMatrix::new(ty, 1, x.len(), Arc::new(w_row.to_vec()), 0)?;
    let mut out = [0f32];
    matmul(&w, x, 1, &mut out);
    Ok(out[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;
    use crate::cpu::kernels::simd::available;

    fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }

    const WEIGHT_TYPES: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::IQ4_NL,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_XS,
    ];

    /// Dequantized matrix (f64).
    fn dense(w: &QMatrix) -> Vec<Vec<f64>> {
        (0..w.rows())
            .map(|r| {
                let mut v = vec![0f32; w.cols()];
                w.dequantize_row(r, &mut v);
                v.into_iter().map(f64::from).collect()
            })
            .collect()
    }

    /// The activations as the kernels see them (dequantized vec_dot_type), f64.
    fn acts_as_seen(ty: GgmlType, x: &[f32], cols: usize, n: usize) -> Vec<f64> {
        let kind = act_kind(ty);
        if kind == ActKind::F32 {
            return x.iter().map(|&v| v as f64).collect();
        }
        let mut a = Acts::default();
        a.quantize(kind, x, cols, n, Isa::Scalar);
        let bs = kind.block();
        (0..n * cols).map(|i| a.qs[i] as f64 * a.d[(i / cols) * (cols / bs) + (i % cols) / bs] as f64).collect()
    }

    /// llama.cpp's Q4_1 (and Q5_1) dot uses s = f16(d_y * sum(q_y)) for the min term: the
    /// difference between that and the exact m * d_y * sum(q_y), per row/token.
    fn q4_1_s_rounding(w: &QMatrix, x: &[f32], n: usize) -> Vec<Vec<f64>> {
        let mut a = Acts::default();
        a.quantize(ActKind::Q8_1, x, w.cols(), n, Isa::Scalar);
        let nb = w.cols() / 32;
        (0..w.rows())
            .map(|r| {
                let row = w.row_bytes(r);
                (0..n)
                    .map(|t| {
                        (0..nb)
                            .map(|b| {
                                let m = crate::quant::blocks::f16_at(row, b * w.ty().type_size() + 2) as f64;
                                let sumq: f64 = a.qs[t * w.cols() + b * 32..][..32].iter().map(|&q| q as f64).sum();
                                m * (a.s[t * nb + b] as f64 - a.d[t * nb + b] as f64 * sumq)
                            })
                            .sum()
                    })
                    .collect()
            })
            .collect()
    }

    /// Checks matmul on every ISA against f64 references: tight against the
    /// dequantized operands, loose against the original f32 activations.
    fn check(ty: GgmlType, rows: usize, cols: usize, n: usize, seed: u64) {
        let wdata = data(rows * cols, seed, 0.5);
        let x = data(n * cols, seed + 1, 2.0);
        let w = QMatrix::quantize(ty, rows, cols, &wdata).unwrap();
        let wd = dense(&w);
        let xq = acts_as_seen(ty, &x, cols, n);
        let corr = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1).then(|| q4_1_s_rounding(&w, &x, n));
        let mut first: Option<Vec<f32>> = None;
        for isa in available() {
            let mut out = vec![f32::NAN; n * rows];
            matmul_isa(&w, &x, n, &mut out, isa);
            for t in 0..n {
                for r in 0..rows {
                    let (mut exact, mut mag, mut orig) = (0f64, 0f64, 0f64);
                    for k in 0..cols {
                        exact += wd[r][k] * xq[t * cols + k];
                        mag += (wd[r][k] * xq[t * cols + k]).abs();
                        orig += wd[r][k] * x[t * cols + k] as f64;
                    }
                    if let Some(c) = &corr {
                        exact += c[r][t];
                    }
                    let got = out[t * rows + r] as f64;
                    let tol = 2e-5 * mag + 1e-5;
                    assert!((got - exact).abs() <= tol, "{} {isa:?} r{r} t{t}: {got} vs {exact} (tol {tol})", ty.name());
                    // 8-bit activations: about 1/254 of each block's max per element.
                    let tol_orig = 0.01 * mag + 1e-4;
                    assert!((got - orig).abs() <= tol_orig, "{} {isa:?} r{r} t{t}: {got} vs f32 x {orig}", ty.name());
                }
            }
            match &first {
                None => first = Some(out),
                Some(s) => {
                    for (a, b) in s.iter().zip(&out) {
                        assert!((a - b).abs() <= 1e-4 * (a.abs() + 1.0), "{} {isa:?} vs scalar: {b} vs {a}", ty.name());
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_all_types_all_isas() {
        for ty in WEIGHT_TYPES {
            let cols = if ty.block_size() == 256 { 512 } else { 96 };
            for (rows, n) in [(1, 1), (13, 1), (7, 3), (9, 5), (6, 17)] {
                check(ty, rows, cols, n, rows as u64 * 31 + n as u64);
            }
        }
    }

    #[test]
    fn float_tail_columns() {
        // cols not a multiple of the 16-wide SIMD loop.
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            check(ty, 5, 37, 3, 9);
        }
    }

    #[test]
    fn matmul_parallel_and_token_tiles() {
        // Large enough to use the pool, more tokens than one tile.
        check(GgmlType::Q4_1, 300, 256, 70, 5);
        check(GgmlType::Q8_0, 1030, 128, 2, 6);
        check(GgmlType::Q6_K, 90, 512, 5, 7);
    }

    #[test]
    fn sixteen_row_kernel_shapes() {
        // Whole 16-row groups (gemm16 on AVX512) plus leftover rows, token
        // counts around the kernel's 8-token register tile.
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::IQ4_NL] {
            for (rows, n) in [(16, 4), (37, 9), (48, 17), (33, 3), (40, 1), (17, 2)] {
                check(ty, rows, 64, n, rows as u64 * 7 + n as u64);
            }
        }
        // gemm16k (the super-block types) from 8 tokens, around its 2-token tile.
        for ty in [GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::IQ4_XS] {
            for (rows, n) in [(16, 3), (37, 9), (33, 8), (17, 11)] {
                check(ty, rows, 512, n, rows as u64 * 7 + n as u64);
            }
        }
    }

    #[test]
    fn every_token_count_gives_each_token_its_one_token_bits() {
        // A sequence's numbers must not depend on how many tokens share a
        // matmul (decode, batched decode, prefill chunks, a verify pass): every
        // token of a batch gets the bits it gets alone, for every type and ISA,
        // on both sides of each token-count threshold (gemm16k's MIN_TOKENS,
        // the 4-token tiles, TOKEN_TILE) and of the parallel split (the larger
        // shape is shared out over the pool even for one token).
        let max_n = 35;
        let mut bad = Vec::new();
        for ty in WEIGHT_TYPES {
            for (rows, cols) in [(53, 256), (300, 512)] {
                let seed = rows as u64 + ty.id() as u64;
                let w = match ty.block_size() {
                    1 => QMatrix::quantize(ty, rows, cols, &data(rows * cols, seed, 0.1)).unwrap(),
                    _ => QMatrix::random(ty, rows, cols, seed).unwrap(),
                };
                let x = data(max_n * cols, seed + 1, 1.0);
                for isa in available() {
                    let alone: Vec<Vec<f32>> = x
                        .chunks_exact(cols)
                        .map(|xt| {
                            let mut o = vec![f32::NAN; rows];
                            matmul_isa(&w, xt, 1, &mut o, isa);
                            o
                        })
                        .collect();
                    for n in (2..=20).chain([33, max_n]) {
                        let mut all = vec![f32::NAN; n * rows];
                        matmul_isa(&w, &x[..n * cols], n, &mut all, isa);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        if let Some(t) = (0..n).find(|&t| bits(&all[t * rows..(t + 1) * rows]) != bits(&alone[t])) {
                            bad.push(format!("{} {isa:?} {rows}x{cols}: {n} tokens, token {t}", ty.name()));
                            break;
                        }
                    }
                }
            }
        }
        assert!(bad.is_empty(), "a token's bits depend on the batch:\n{}", bad.join("\n"));
    }

    #[test]
    fn the_interleaved_copy_gives_the_rows_bits() {
        // gemm16 reading a matrix's 16-row copy (kernels::interleave) must
        // compute what it computes from the rows: every token count around its
        // paths (one token, Q4_1's two, the direct tiles to 8, the packed copy
        // past them), odd and even block counts (Q4_0 and Q8_0 pair blocks),
        // and rows past the last whole group (read from the rows).
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::IQ4_NL, GgmlType::Q8_0] {
            for nb in [1, 3, 4, 18] {
                let (rows, cols) = (40, 32 * nb);
                let plain = QMatrix::random(ty, rows, cols, 7 + nb as u64).unwrap();
                let mut copied = plain.clone();
                let Some(copy) = super::super::interleave::interleave(&copied) else { panic!("{ty:?} has a copy") };
                copied.set_interleaved(copy);
                let x = data(20 * cols, 11 + nb as u64, 1.0);
                for isa in available() {
                    for n in 1..=20 {
                        let (mut a, mut b) = (vec![f32::NAN; n * rows], vec![f32::NAN; n * rows]);
                        matmul_isa(&plain, &x[..n * cols], n, &mut a, isa);
                        matmul_isa(&copied, &x[..n * cols], n, &mut b, isa);
                        assert_eq!(bits(&a), bits(&b), "{ty:?}, {nb} blocks, {n} tokens on {isa:?}");
                    }
                }
                // Where gemm16 runs, the copy is what it reads: zeroed, the first group's outputs change.
                if available().contains(&Isa::Avx512Vnni) {
                    let Some(mut copy) = super::super::interleave::interleave(&plain) else { unreachable!() };
                    copy.lines.iter_mut().for_each(|l| l.0 = [0; 64]);
                    let mut zeroed = plain.clone();
                    zeroed.set_interleaved(copy);
                    for n in [1, 2, 5, 12] {
                        let (mut a, mut b) = (vec![f32::NAN; n * rows], vec![f32::NAN; n * rows]);
                        matmul_isa(&plain, &x[..n * cols], n, &mut a, Isa::Avx512Vnni);
                        matmul_isa(&zeroed, &x[..n * cols], n, &mut b, Isa::Avx512Vnni);
                        assert_ne!(bits(&a[..16]), bits(&b[..16]), "{ty:?}, {nb} blocks, {n} tokens: the copy was not read");
                    }
                }
            }
        }
    }

    #[test]
    fn one_token_every_block_count() {
        // gemm16's one-token path takes Q4_1 blocks four, two and one at a
        // time: every remainder, and Q4_0's blocks, against the packed path
        // (three tokens).
        for (ty, nb) in (1..=10).flat_map(|nb| [(GgmlType::Q4_1, nb), (GgmlType::Q4_0, nb)]) {
            let (rows, cols) = (48, 32 * nb);
            let w = QMatrix::random(ty, rows, cols, nb as u64).unwrap();
            let x = data(3 * cols, 90 + nb as u64, 1.0);
            for isa in available() {
                let (mut one, mut three) = (vec![f32::NAN; rows], vec![f32::NAN; 3 * rows]);
                matmul_isa(&w, &x[..cols], 1, &mut one, isa);
                matmul_isa(&w, &x, 3, &mut three, isa);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&one), bits(&three[..rows]), "{ty:?}, {nb} blocks on {isa:?}");
            }
        }
    }

    #[test]
    fn group_matches_separate_matmuls_bit_for_bit() {
        // Mixed types share one input: Q4_0 and Q8_0 need different unsigned
        // biases on gemm16, Q4_1 another activation type, Q6_K and F16 others
        // again; on AVX2, Q8_0 and Q5_0 share Q8_0 activations but gemm8
        // takes different token counts of them (13: 8 for Q8_0, all for Q5_0).
        let cols = 256;
        let types = [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q6_K, GgmlType::F16, GgmlType::Q4_0];
        for n in [5, 13, 22] {
            let x = data(n * cols, 3, 1.0);
            let ws: Vec<QMatrix> = types
                .iter()
                .enumerate()
                .map(|(i, &ty)| QMatrix::quantize(ty, 40 + 16 * i, cols, &data((40 + 16 * i) * cols, 10 + i as u64, 0.1)).unwrap())
                .collect();
            for isa in simd::available() {
                let separate: Vec<Vec<f32>> = ws
                    .iter()
                    .map(|w| {
                        let mut out = vec![0.0; n * w.rows()];
                        matmul_isa(w, &x, n, &mut out, isa);
                        out
                    })
                    .collect();
                let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; n * w.rows()]).collect();
                let mut parts: Vec<(&QMatrix, &mut [f32])> = ws.iter().zip(outs.iter_mut()).map(|(w, o)| (w, o.as_mut_slice())).collect();
                matmul_group_isa(&x, n, &mut parts, isa);
                for (i, (a, b)) in outs.iter().zip(&separate).enumerate() {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(a), bits(b), "{:?} (matrix {i}) on {isa:?}, {n} tokens", types[i]);
                }
            }
        }
    }

    #[test]
    fn gated_matches_separate_matmuls_then_combine() {
        let combine = |a: &mut [f32], b: &[f32]| {
            for (x, &y) in a.iter_mut().zip(b) {
                *x = *x * 0.5 - y;
            }
        };
        // Large enough for the pool; rows that are not whole 16s; mixed types.
        for (ta, tb, rows, n) in [(GgmlType::Q4_1, GgmlType::Q4_1, 200, 7), (GgmlType::Q4_0, GgmlType::Q6_K, 72, 16), (GgmlType::Q8_0, GgmlType::F16, 5, 1)] {
            let cols = 256;
            let x = data(n * cols, 4, 1.0);
            let wa = QMatrix::quantize(ta, rows, cols, &data(rows * cols, 5, 0.1)).unwrap();
            let wb = QMatrix::quantize(tb, rows, cols, &data(rows * cols, 6, 0.1)).unwrap();
            let (mut ea, mut eb) = (vec![0.0; n * rows], vec![0.0; n * rows]);
            matmul(&wa, &x, n, &mut ea);
            matmul(&wb, &x, n, &mut eb);
            combine(&mut ea, &eb);
            let (mut ga, mut gb) = (vec![f32::NAN; n * rows], vec![f32::NAN; n * rows]);
            matmul_gated(&x, n, (&wa, &mut ga), (&wb, &mut gb), &combine);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&ga), bits(&ea), "{ta:?} with {tb:?}, {rows} rows, {n} tokens");
        }
        // No columns: both products are 0, and the join still applies (0 * 0.5 - 0 = 0, then -1).
        let shift = |a: &mut [f32], b: &[f32]| {
            for (x, &y) in a.iter_mut().zip(b) {
                *x = *x * 0.5 - y - 1.0;
            }
        };
        let (wa, wb) = (QMatrix::from_f32(3, 0, vec![]), QMatrix::from_f32(3, 0, vec![]));
        let (mut ga, mut gb) = (vec![f32::NAN; 6], vec![f32::NAN; 6]);
        matmul_gated(&[], 2, (&wa, &mut ga), (&wb, &mut gb), &shift);
        assert_eq!(ga, vec![-1.0; 6]);
        // An empty group does nothing.
        matmul_group(&[0.0; 4], 2, &mut []);
    }

    #[test]
    fn unaligned_offset_and_slices() {
        // Few tokens (per-row kernels) and enough rows and tokens for gemm16,
        // whose row slice must cover whole 16-row groups of the full matrix to
        // run the same kernel (and so give the same bits).
        for (rows, n, r0) in [(12, 3, 4), (36, 5, 16)] {
            slices_case(rows, n, r0);
        }
    }

    fn slices_case(rows: usize, n: usize, r0: usize) {
        let (r1, cols) = (r0 + if rows > 16 { 16 } else { 6 }, 128);
        let wdata = data(rows * cols, 11, 1.0);
        let x = data(n * cols, 12, 1.0);
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::F16] {
            let full = QMatrix::quantize(ty, rows, cols, &wdata).unwrap();
            // Same bytes at an odd offset inside a bigger buffer.
            let rb = ty.row_bytes(cols).unwrap();
            let mut buf = vec![0xAAu8; 3];
            for r in 0..rows {
                buf.extend_from_slice(full.row_bytes(r));
            }
            buf.push(0x55);
            let moved = QMatrix::new(ty, rows, cols, Arc::new(buf), 3).unwrap();
            assert_eq!(moved.row_bytes(5), full.row_bytes(5));
            assert_eq!(moved.row_bytes(5).len(), rb);
            let mut a = vec![0f32; n * rows];
            let mut b = vec![0f32; n * rows];
            matmul(&full, &x, n, &mut a);
            matmul(&moved, &x, n, &mut b);
            assert_eq!(a, b);

            // Row slice = those rows of the full result.
            let rs = moved.slice_rows(r0..r1).unwrap();
            let k = r1 - r0;
            let mut c = vec![0f32; n * k];
            matmul(&rs, &x, n, &mut c);
            for t in 0..n {
                assert_eq!(&c[t * k..t * k + k], &a[t * rows + r0..t * rows + r1]);
            }

            // Column slice: dot over columns 32..96 only.
            let cs = moved.slice_cols(32..96).unwrap();
            assert_eq!((cs.rows(), cs.cols()), (rows, 64));
            let xs: Vec<f32> = (0..n).flat_map(|t| x[t * cols + 32..t * cols + 96].to_vec()).collect();
            let mut d = vec![0f32; n * rows];
            matmul(&cs, &xs, n, &mut d);
            let wd = dense(&full);
            let xq = acts_as_seen(ty, &xs, 64, n);
            let corr = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1).then(|| q4_1_s_rounding(&cs, &xs, n));
            for t in 0..n {
                for r in 0..rows {
                    let mut want: f64 = (0..64).map(|k| wd[r][32 + k] * xq[t * 64 + k]).sum();
                    if let Some(c) = &corr {
                        want += c[r][t];
                    }
                    assert!((d[t * rows + r] as f64 - want).abs() < 1e-4, "{}", ty.name());
                }
            }
            // Slices of slices keep the parent's stride.
            let both = cs.slice_rows(2..3).unwrap();
            let mut row = vec![0f32; 64];
            both.dequantize_row(0, &mut row);
            let mut full_row = vec![0f32; cols];
            full.dequantize_row(2, &mut full_row);
            assert_eq!(&row[..], &full_row[32..96]);
        }
    }

    #[test]
    fn from_f32_and_vec_dot() {
        let m = QMatrix::from_f32(2, 3, vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.0]);
        let mut out = [0f32; 4];
        matmul(&m, &[1.0, 1.0, 1.0, 2.0, 0.0, -1.0], 2, &mut out);
        assert_eq!(out, [6.0, -0.5, -1.0, -2.0]);

        // vec_dot equals the f64 dot of dequantized weights and activations.
        for ty in WEIGHT_TYPES {
            let n = 512;
            let wv = data(n, 21, 1.0);
            let xv = data(n, 22, 3.0);
            let wq = crate::quant::quantize_row(ty, &wv).unwrap();
            let mut wd = vec![0f32; n];
            dequantize_row(ty, &wq, &mut wd).unwrap();
            let xq = acts_as_seen(ty, &xv, n, 1);
            let mut want: f64 = wd.iter().zip(&xq).map(|(a, b)| *a as f64 * b).sum();
            if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                let w1 = QMatrix::new(ty, 1, n, Arc::new(wq.clone()), 0).unwrap();
                want += q4_1_s_rounding(&w1, &xv, 1)[0][0];
            }
            let mag: f64 = wd.iter().zip(&xq).map(|(a, b)| (*a as f64 * b).abs()).sum();
            let got = vec_dot(ty, &wq, &xv).unwrap() as f64;
            assert!((got - want).abs() <= 1e-5 * mag, "{}: {got} vs {want}", ty.name());
        }
        assert!(vec_dot(GgmlType::Q4_0, &[0u8; 18], &[0.0; 64]).is_err());
    }

    #[test]
    fn random_blocks_against_f64_dequantized_dot() {
        // Each dot product (scalar and every SIMD body this CPU has, per-row tiles
        // and 16-row kernels) against sum(dequant(w) * dequant(x)) in f64.
        for ty in WEIGHT_TYPES.into_iter().filter(|t| t.block_size() > 1) {
            let cols = if ty.block_size() == 256 { 512 } else { 128 };
            for (rows, n) in [(1, 1), (5, 3), (19, 2), (33, 9), (32, 16)] {
                let w = QMatrix::random(ty, rows, cols, rows as u64 * 1000 + n as u64 + ty.id() as u64).unwrap();
                let x = data(n * cols, 77 + n as u64, 1.5);
                let wd = dense(&w);
                let xq = acts_as_seen(ty, &x, cols, n);
                let corr = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1).then(|| q4_1_s_rounding(&w, &x, n));
                let mut scalar: Option<Vec<f32>> = None;
                for isa in available() {
                    let mut out = vec![f32::NAN; n * rows];
                    matmul_isa(&w, &x, n, &mut out, isa);
                    for t in 0..n {
                        for r in 0..rows {
                            let (mut want, mut mag) = (0f64, 0f64);
                            for k in 0..cols {
                                want += wd[r][k] * xq[t * cols + k];
                                mag += (wd[r][k] * xq[t * cols + k]).abs();
                            }
                            if let Some(c) = &corr {
                                want += c[r][t];
                            }
                            let got = out[t * rows + r] as f64;
                            assert!((got - want).abs() <= 2e-5 * mag + 1e-6, "{} {isa:?} {rows}x{n} r{r} t{t}: {got} vs {want}", ty.name());
                        }
                    }
                    match &scalar {
                        None => scalar = Some(out),
                        Some(sc) => {
                            for (a, b) in sc.iter().zip(&out) {
                                assert!((a - b).abs() <= 1e-4 * (a.abs() + 1.0), "{} {isa:?} vs scalar: {b} vs {a}", ty.name());
                            }
                        }
                    }
                }
            }
        }
    }
}
