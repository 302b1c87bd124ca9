//! The wire codec of the QUIC link: versioned postcard messages in
//! length-delimited frames. Sans-IO: bytes in, messages out, no sockets.
//!
//! ```text
//! frame   = len: u32 big-endian | payload (len bytes)
//! payload = CODEC_VERSION: u8   | postcard bytes of one ToEngine or FromEngine
//! ```
//!
//! Everything read off the wire is untrusted. A frame's declared length is
//! checked against the decoder's limit ([`MAX_HANDSHAKE_FRAME_BYTES`] until the
//! handshake is done, then [`MAX_FRAME_BYTES`]) and, once the payload's first
//! bytes name the message kind, against that kind's own bound
//! ([`Message::max_payload`]), all before the rest arrives; the buffer grows
//! only with bytes that did arrive. A version byte this build does not speak is
//! refused, every vector is read against its bound (`protocol.rs`), and a
//! payload must decode to exactly one message (no trailing bytes). Errors,
//! never panics.
//!
//! What decoding a payload of `L` bytes may allocate. Per byte on the wire an
//! element takes at most 6 bytes of memory (a `TokenLogprob`: 40 for at least
//! 7; a token: 4 for at least 1), except kinds capped by count: outputs (136
//! for 8; [`MAX_OUTPUTS_PER_BATCH`], 8.5 MiB), KV events (16 for 1;
//! [`MAX_KV_EVENTS`], 1 MiB), the ids of an `Abort` (8 for 1;
//! [`MAX_ABORT_IDS`], 0.5 MiB) and the strings of a choice constraint (24 for
//! 1; `MAX_CONSTRAINT_BYTES`, 6 MiB). Vectors reserve at the length they claim
//! out of a budget of 8 L for the whole payload, else 64 KiB at most, and grow
//! with their elements; so honest vectors are allocated once, at their size,
//! and a lie costs at most the budget. All told: at most 6 L plus the capped
//! kinds, twice that while vectors grow (`tests/alloc.rs` measures the worst
//! cases), and under 1 MiB for a frame read before the handshake (L ≤ 16 KiB:
//! at most 2048 outputs).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{EngineCommand, EngineOutputs, FromEngine, ToEngine, MAX_ABORT_IDS, MAX_OUTPUTS_PER_BATCH};
#[cfg(doc)]
use crate::MAX_KV_EVENTS;

/// The payload's first byte. Bumped when the encoding of the messages changes in
/// a way `PROTOCOL_VERSION` does not cover (another serde format, say).
pub const CODEC_VERSION: u8 = 1;

/// The largest payload (version byte included) either side sends or accepts.
///
/// Why 16 MiB: the largest message is an `Add` of a max-length prompt. postcard
/// writes a u32 token as a varint of at most 5 bytes, so a 1M-token prompt is at
/// most 5 MiB; 16 MiB leaves slack for a longer context, the sampling params and
/// their stop ids, and an output batch with top logprobs for every running
/// sequence (those are kilobytes per step). Anything larger is a bug or an attack.
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// The largest payload of a handshake message (`Hello`, `Welcome`), and of any
/// frame read before the handshake is done: the API node reads no more from a
/// peer it has not accepted, the engine no more from an API node that has not
/// welcomed it. A `Hello` is a model name and a few numbers (under 200 bytes
/// for a typical name); a `Welcome` carries a refusal's reason.
pub const MAX_HANDSHAKE_FRAME_BYTES: usize = 16 << 10;

/// The largest `Abort` payload: [`MAX_ABORT_IDS`] ids of at most 10 bytes each
/// (a u64 as a varint), with its tags and length.
pub const MAX_ABORT_FRAME_BYTES: usize = MAX_ABORT_IDS * 10 + 16;

/// The largest `Shutdown` payload (it is 3 bytes).
pub const MAX_SHUTDOWN_FRAME_BYTES: usize = 16;

/// Bytes of the length prefix.
const LEN_BYTES: usize = 4;

/// What the vectors of one payload may reserve at their claimed lengths, per
/// byte of the payload: more than any element expands outside the kinds
/// capped by count (6), so honest vectors are reserved exactly.
const RESERVE_FACTOR: usize = 8;

/// Payload bytes that name a message's kind: the version byte and at most two
/// one-byte variant tags (postcard writes a variant index as a varint).
const KIND_BYTES: usize = 3;

/// A buffer holding more than this much unused capacity after a large frame
/// gives it back, so an idle link holds little memory.
const IDLE_BUFFER_BYTES: usize = 1 << 20;

/// A message the codec carries, with a bound on the payload of each kind.
pub trait Message: Serialize + DeserializeOwned {
    /// The kind of this message and the largest payload (version byte
    /// included) it may have.
    fn bound(&self) -> (&'static str, usize);

    /// The kind and bound of the message whose payload begins with `head`
    /// (version byte included), or None while `head` is too short to tell. An
    /// unknown kind is an error, so its bytes are never waited for.
    fn max_payload(head: &[u8]) -> Result<Option<(&'static str, usize)>, CodecError>;
}

/// The variant tag at `at` in `head`, if it is there. A tag of 128 or more would
/// take two bytes: no message has that many kinds.
fn tag(head: &[u8], at: usize) -> Option<u8> {
    head.get(at).copied()
}

fn unknown_kind(what: &str, tag: u8) -> CodecError {
    CodecError::Malformed(format!("unknown {what} kind {tag}"))
}

impl Message for ToEngine {
    fn bound(&self) -> (&'static str, usize) {
        match self {
            ToEngine::Welcome(_) => ("Welcome", MAX_HANDSHAKE_FRAME_BYTES),
            ToEngine::Command(EngineCommand::Add(_)) => ("Add", MAX_FRAME_BYTES),
            ToEngine::Command(EngineCommand::Abort(_)) => ("Abort", MAX_ABORT_FRAME_BYTES),
            ToEngine::Command(EngineCommand::Shutdown) => ("Shutdown", MAX_SHUTDOWN_FRAME_BYTES),
        }
    }

    fn max_payload(head: &[u8]) -> Result<Option<(&'static str, usize)>, CodecError> {
        match (tag(head, 1), tag(head, 2)) {
            (Some(0), _) => Ok(Some(("Welcome", MAX_HANDSHAKE_FRAME_BYTES))),
            (Some(1), Some(0)) => Ok(Some(("Add", MAX_FRAME_BYTES))),
            (Some(1), Some(1)) => Ok(Some(("Abort", MAX_ABORT_FRAME_BYTES))),
            (Some(1), Some(2)) => Ok(Some(("Shutdown", MAX_SHUTDOWN_FRAME_BYTES))),
            (Some(1), Some(t)) => Err(unknown_kind("command", t)),
            (Some(1), None) | (None, _) => Ok(None),
            (Some(t), _) => Err(unknown_kind("message", t)),
        }
    }
}

impl Message for FromEngine {
    fn bound(&self) -> (&'static str, usize) {
        match self {
            FromEngine::Hello(_) => ("Hello", MAX_HANDSHAKE_FRAME_BYTES),
            FromEngine::Outputs(_) => ("Outputs", MAX_FRAME_BYTES),
        }
    }

    fn max_payload(head: &[u8]) -> Result<Option<(&'static str, usize)>, CodecError> {
        match tag(head, 1) {
            Some(0) => Ok(Some(("Hello", MAX_HANDSHAKE_FRAME_BYTES))),
            Some(1) => Ok(Some(("Outputs", MAX_FRAME_BYTES))),
            Some(t) => Err(unknown_kind("message", t)),
            None => Ok(None),
        }
    }
}

/// Why a message could not be framed, or a frame could not be read. After a
/// decoding error the stream is out of sync, and the QUIC link closes.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// A payload over the frame limit: the decoder's current one (refused
    /// from the length prefix alone), or [`MAX_FRAME_BYTES`] when encoding.
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    FrameTooLarge {
        /// The payload's length in bytes (declared by the prefix, when decoding).
        len: usize,
        /// The limit it is over, in bytes.
        max: usize,
    },
    /// A payload within the frame limit but over its kind's own bound
    /// ([`Message::bound`]).
    #[error("{kind} of {len} bytes is over its limit of {max} bytes")]
    MessageTooLarge {
        /// The message kind, as the bound names it (`"Abort"`, `"Hello"`, ...).
        kind: &'static str,
        /// The payload's length in bytes, version byte included.
        len: usize,
        /// That kind's bound in bytes.
        max: usize,
    },
    /// A frame whose length prefix says 0.
    #[error("empty frame: no codec version byte")]
    EmptyFrame,
    /// The payload's first byte is not [`CODEC_VERSION`].
    #[error("codec version {got} is not spoken here (this build speaks {expected})")]
    UnknownVersion {
        /// The version byte the payload carried.
        got: u8,
        /// [`CODEC_VERSION`].
        expected: u8,
    },
    /// postcard could not decode the payload, a vector was over its bound,
    /// or the kind tag is unknown; the text says which.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The payload held one message and this many bytes more.
    #[error("{0} trailing bytes after the message in its frame")]
    TrailingBytes(usize),
    /// postcard could not serialize the message (the sender's own bug).
    #[error("message could not be encoded: {0}")]
    Encode(String),
}

/// One message as a complete frame, ready to write. Refuses to produce a frame
/// the other side would refuse (over [`MAX_FRAME_BYTES`] or its kind's bound;
/// [`split_command`] and [`split_outputs`] first keep a long `Abort` or a
/// large batch within them).
pub fn encode<T: Message>(msg: &T) -> Result<Vec<u8>, CodecError> {
    // Serialize behind a placeholder prefix so the frame is built in one buffer.
    let mut frame = vec![0u8; LEN_BYTES];
    frame.push(CODEC_VERSION);
    let mut frame = postcard::to_extend(msg, frame).map_err(|e| CodecError::Encode(e.to_string()))?;
    let len = frame.len() - LEN_BYTES;
    if len > MAX_FRAME_BYTES {
        return Err(CodecError::FrameTooLarge { len, max: MAX_FRAME_BYTES });
    }
    let (kind, max) = msg.bound();
    if len > max {
        return Err(CodecError::MessageTooLarge { kind, len, max });
    }
    // len <= MAX_FRAME_BYTES < u32::MAX, so the cast is exact.
    frame[..LEN_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Decodes one payload (version byte + postcard bytes) into a message, after
/// checking its kind's bound.
pub fn decode_payload<T: Message>(payload: &[u8]) -> Result<T, CodecError> {
    if payload.is_empty() {
        return Err(CodecError::EmptyFrame);
    }
    check_head::<T>(payload, payload.len())?;
    decode_checked(payload)
}

/// Checks the version byte, and the bound of the kind `head` (the first bytes
/// of a payload of `len`) names. False while `head` is too short to tell and
/// more of the payload is to come; a whole payload too short to name a kind
/// passes, to fail as malformed.
fn check_head<T: Message>(head: &[u8], len: usize) -> Result<bool, CodecError> {
    let Some(&version) = head.first() else { return Ok(false) };
    if version != CODEC_VERSION {
        return Err(CodecError::UnknownVersion { got: version, expected: CODEC_VERSION });
    }
    match T::max_payload(head)? {
        Some((kind, max)) if len > max => Err(CodecError::MessageTooLarge { kind, len, max }),
        Some(_) => Ok(true),
        None => Ok(head.len() >= len),
    }
}

/// Decodes a payload whose head was checked. Memory follows the bytes: see the
/// module's note.
fn decode_checked<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let body = payload.get(1..).unwrap_or_default();
    let budget = RESERVE_FACTOR.saturating_mul(payload.len());
    let decoded = crate::protocol::with_reserve_budget(budget, || postcard::take_from_bytes::<T>(body));
    let (msg, rest) = decoded.map_err(|e| {
        let why = crate::protocol::take_over_bound().unwrap_or_else(|| e.to_string());
        CodecError::Malformed(why)
    })?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Splits a message that would be over its kind's bound into several that are
/// not, meaning the same: an `Abort` into `Abort`s of at most
/// [`MAX_ABORT_IDS`], a batch into batches of at most
/// [`MAX_OUTPUTS_PER_BATCH`] outputs (see [`split_outputs`]). Anything else
/// is returned as it is.
pub fn split_command(msg: ToEngine) -> Vec<ToEngine> {
    match msg {
        ToEngine::Command(EngineCommand::Abort(ids)) if ids.len() > MAX_ABORT_IDS => {
            ids.chunks(MAX_ABORT_IDS).map(|c| ToEngine::Command(EngineCommand::Abort(c.to_vec()))).collect()
        }
        msg => vec![msg],
    }
}

/// See [`split_command`].
pub fn split_outputs(msg: FromEngine) -> Vec<FromEngine> {
    match msg {
        FromEngine::Outputs(o) if o.outputs.len() > MAX_OUTPUTS_PER_BATCH => {
            split_batch(o, MAX_OUTPUTS_PER_BATCH).into_iter().map(FromEngine::Outputs).collect()
        }
        msg => vec![msg],
    }
}

/// Splits `batch` into batches of at most `max` outputs. A request's outputs
/// stay in one batch, in their order (the gateway's checks retire a request
/// that failed at the end of the batch that says so, so its other outputs
/// must not come later); requests may change order. The first batch carries
/// the step reports and KV events, every one the figures.
fn split_batch(batch: EngineOutputs, max: usize) -> Vec<EngineOutputs> {
    let EngineOutputs { rank, mut outputs, stats, kv_events } = batch;
    outputs.sort_by_key(|o| o.id); // Stable: a request's outputs keep their order.
    let mut batches: Vec<EngineOutputs> = Vec::new();
    let mut rest = outputs.as_slice();
    while !rest.is_empty() {
        let run = |i: usize| rest[i..].iter().take_while(|o| o.id == rest[i].id).count();
        let mut end = run(0);
        while end < rest.len() && end + run(end) <= max {
            end += run(end);
        }
        let stats = if batches.is_empty() { stats.clone() } else { crate::EngineStats { step_tokens: Vec::new(), ..stats.clone() } };
        batches.push(EngineOutputs { rank, outputs: rest[..end].to_vec(), stats, kv_events: Vec::new() });
        rest = &rest[end..];
    }
    if let Some(first) = batches.first_mut() {
        first.kv_events = kv_events;
    }
    batches
}

/// Incremental frame decoder: push bytes as they arrive, pop complete frames.
///
/// After an error the stream is out of sync for good; the decoder keeps
/// returning that error.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as frames (compacted on the next push,
    /// so popping many small frames costs no quadratic moves).
    start: usize,
    /// The largest frame accepted now (see [`Self::set_max_frame`]).
    max_frame: usize,
    failed: Option<CodecError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder { buf: Vec::new(), start: 0, max_frame: MAX_FRAME_BYTES, failed: None }
    }
}

impl FrameDecoder {
    /// A decoder that takes frames up to [`MAX_FRAME_BYTES`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder for a link whose handshake is not done: frames up to
    /// [`MAX_HANDSHAKE_FRAME_BYTES`] until [`Self::set_max_frame`] raises it.
    pub fn before_handshake() -> Self {
        FrameDecoder { max_frame: MAX_HANDSHAKE_FRAME_BYTES, ..Self::default() }
    }

    /// The largest frame accepted from now on (at most [`MAX_FRAME_BYTES`]).
    /// It applies to frames whose length has not been read yet.
    pub fn set_max_frame(&mut self, max: usize) {
        self.max_frame = max.min(MAX_FRAME_BYTES);
    }

    /// The largest frame accepted now, in payload bytes (see [`Self::set_max_frame`]).
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Appends bytes read off the wire. The caller reads in bounded chunks and
    /// pops after each push, so the buffer holds at most one frame plus a chunk,
    /// and only bytes that arrived: a declared length reserves nothing.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
            // A large frame left a large buffer: give it back once it is mostly empty.
            if self.buf.capacity() > IDLE_BUFFER_BYTES && self.buf.len() * 4 < self.buf.capacity() {
                self.buf.shrink_to(self.buf.len().max(IDLE_BUFFER_BYTES / 4));
            }
        }
        self.grow_for(bytes.len());
        self.buf.extend_from_slice(bytes);
    }

    /// Makes room for `more` bytes: doubling as bytes arrive (so a large frame
    /// is not copied over and over), but never past the end of the frame being
    /// read when its length is known and allowed, so the buffer stays within
    /// twice what arrived and within the frame.
    fn grow_for(&mut self, more: usize) {
        let needed = self.buf.len() + more;
        if needed <= self.buf.capacity() {
            return;
        }
        let frame_end = match self.buf.get(self.start..self.start + LEN_BYTES) {
            Some(prefix) => {
                let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
                if len <= self.max_frame { self.start + LEN_BYTES + len } else { 0 }
            }
            None => 0,
        };
        let target = (self.buf.capacity() * 2).min(frame_end.max(needed)).max(needed);
        self.buf.reserve_exact(target - self.buf.len());
    }

    /// Bytes of memory the buffer holds (for tests).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete payload (version byte + message bytes), if one has
    /// fully arrived. Never longer than the decoder's limit. Checks no kind:
    /// [`Self::pop`] does.
    pub fn pop_payload(&mut self) -> Result<Option<&[u8]>, CodecError> {
        self.next_payload(|_, _| Ok(true))
    }

    /// The length of the frame at the front, checked against the limit before
    /// its bytes are waited for; then `check(head, len)` on the first bytes of
    /// the payload as they arrive (up to [`KIND_BYTES`]), until it tells (true);
    /// then the payload, once all of it is here.
    fn next_payload(&mut self, check: impl Fn(&[u8], usize) -> Result<bool, CodecError>) -> Result<Option<&[u8]>, CodecError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let avail = &self.buf[self.start..];
        let Some(prefix) = avail.get(..LEN_BYTES) else { return Ok(None) };
        let mut len_be = [0u8; LEN_BYTES];
        len_be.copy_from_slice(prefix);
        let len = u32::from_be_bytes(len_be) as usize;
        if len > self.max_frame {
            return Err(self.fail(CodecError::FrameTooLarge { len, max: self.max_frame }));
        }
        if len == 0 {
            return Err(self.fail(CodecError::EmptyFrame));
        }
        let head = &avail[LEN_BYTES..avail.len().min(LEN_BYTES + len.min(KIND_BYTES))];
        match check(head, len) {
            Err(e) => return Err(self.fail(e)),
            Ok(false) => return Ok(None),
            Ok(true) => {}
        }
        if avail.len() < LEN_BYTES + len {
            return Ok(None);
        }
        let from = self.start + LEN_BYTES;
        self.start = from + len;
        Ok(Some(&self.buf[from..from + len]))
    }

    /// The next complete message, if one has fully arrived. Its kind's bound is
    /// checked as soon as its first bytes are here.
    pub fn pop<T: Message>(&mut self) -> Result<Option<T>, CodecError> {
        let decoded = match self.next_payload(check_head::<T>)? {
            None => return Ok(None),
            Some(payload) => decode_checked::<T>(payload),
        };
        match decoded {
            Ok(msg) => Ok(Some(msg)),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn fail(&mut self, e: CodecError) -> CodecError {
        self.failed = Some(e.clone());
        self.buf = Vec::new();
        self.start = 0;
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    fn add(id: u64, prompt_len: usize) -> ToEngine {
        ToEngine::Command(EngineCommand::Add(Box::new(EngineRequest::new(id, (0..prompt_len as u32).collect(), SamplingParams::default()))))
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let msgs = [add(1, 3), ToEngine::Command(EngineCommand::Shutdown), add(2, 0)];
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend(encode(m).unwrap());
        }
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for b in wire {
            dec.push(&[b]);
            while let Some(m) = dec.pop::<ToEngine>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn over_limit_length_is_refused_before_its_bytes_arrive() {
        let mut dec = FrameDecoder::new();
        dec.push(&(MAX_FRAME_BYTES as u32 + 1).to_be_bytes());
        assert!(matches!(dec.pop::<ToEngine>(), Err(CodecError::FrameTooLarge { .. })));
        // The error sticks: the stream is out of sync.
        dec.push(&encode(&add(1, 1)).unwrap());
        assert!(matches!(dec.pop::<ToEngine>(), Err(CodecError::FrameTooLarge { .. })));
        assert!(dec.buf.capacity() < 1024, "nothing of the claimed size was allocated");
    }

    #[test]
    fn a_huge_claimed_sequence_length_allocates_nothing_of_its_size() {
        // Command(Add { id: 0, prompt_tokens: <u32::MAX of them> ... }) with no tokens
        // after the claim: preallocating the claim would be 16 GiB.
        let body = [CODEC_VERSION, 1, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f];
        let mut dec = FrameDecoder::new();
        dec.push(&(body.len() as u32).to_be_bytes());
        dec.push(&body);
        assert!(matches!(dec.pop::<ToEngine>(), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn encode_refuses_an_over_limit_message() {
        // u32::MAX is a 5-byte varint: 4 * 5 bytes per 4 bytes of limit.
        let big = ToEngine::Command(EngineCommand::Add(Box::new(EngineRequest::new(1, vec![u32::MAX; MAX_FRAME_BYTES / 4], SamplingParams::default()))));
        let e = encode(&big).unwrap_err();
        assert!(matches!(e, CodecError::FrameTooLarge { .. }), "{e}");
    }

    #[test]
    fn kv_events_over_the_bound_are_refused_while_decoding() {
        let batch = |n: usize| {
            FromEngine::Outputs(EngineOutputs { rank: 0, outputs: vec![], stats: EngineStats::default(), kv_events: vec![KvEvent::Cleared; n] })
        };
        let mut dec = FrameDecoder::new();
        dec.push(&encode(&batch(MAX_KV_EVENTS)).unwrap());
        assert_eq!(dec.pop::<FromEngine>().unwrap(), Some(batch(MAX_KV_EVENTS)));
        // One more than the bound fits a frame easily (a byte each) but is
        // refused by the decoder itself, before the link's checks see it.
        dec.push(&encode(&batch(MAX_KV_EVENTS + 1)).unwrap());
        assert!(matches!(dec.pop::<FromEngine>(), Err(CodecError::Malformed(_))));
    }

    fn frame_of(payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(payload);
        f
    }

    fn hello() -> FromEngine {
        FromEngine::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            rank: 0,
            model: "m".into(),
            fingerprint: ModelFingerprint::default(),
            vocab_size: 10,
            max_model_len: 64,
            num_kv_blocks: 4,
            block_size: 16,
            node: "n".into(),
        })
    }

    fn batch(outputs: Vec<TokenOutput>) -> FromEngine {
        FromEngine::Outputs(EngineOutputs { rank: 0, outputs, stats: EngineStats::default(), kv_events: vec![] })
    }

    fn output(id: u64, index: u32) -> TokenOutput {
        TokenOutput { id, index, new_tokens: vec![1], logprobs: None, finish: None, num_cached_tokens: 0, prompt_logprobs: None, timing: None }
    }

    fn abort(n: usize) -> ToEngine {
        ToEngine::Command(EngineCommand::Abort((0..n as u64).collect()))
    }

    /// Encodes without the sender's checks, as a hostile peer would.
    fn raw<T: Serialize>(msg: &T) -> Vec<u8> {
        let mut payload = vec![CODEC_VERSION];
        payload.extend(postcard::to_stdvec(msg).unwrap());
        frame_of(&payload)
    }

    #[test]
    fn the_kind_read_off_the_head_is_the_kind_of_the_message() {
        let welcome = ToEngine::Welcome(Welcome { protocol_version: 1, accepted: true, reason: None, rank: 0, retry: false });
        for msg in [welcome, add(1, 3), abort(3), ToEngine::Command(EngineCommand::Shutdown)] {
            let frame = encode(&msg).unwrap();
            assert_eq!(ToEngine::max_payload(&frame[LEN_BYTES..LEN_BYTES + KIND_BYTES]).unwrap(), Some(msg.bound()), "{msg:?}");
        }
        for msg in [hello(), batch(vec![output(1, 0)])] {
            let frame = encode(&msg).unwrap();
            assert_eq!(FromEngine::max_payload(&frame[LEN_BYTES..LEN_BYTES + KIND_BYTES]).unwrap(), Some(msg.bound()), "{msg:?}");
        }
        assert!(matches!(ToEngine::max_payload(&[CODEC_VERSION, 1, 3]), Err(CodecError::Malformed(_))));
        assert!(matches!(FromEngine::max_payload(&[CODEC_VERSION, 2]), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn before_the_handshake_a_frame_over_the_small_limit_is_refused_on_its_length() {
        let mut dec = FrameDecoder::before_handshake();
        dec.push(&(MAX_HANDSHAKE_FRAME_BYTES as u32 + 1).to_be_bytes());
        dec.push(&[CODEC_VERSION, 1]);
        let e = dec.pop::<FromEngine>().unwrap_err();
        assert_eq!(e, CodecError::FrameTooLarge { len: MAX_HANDSHAKE_FRAME_BYTES + 1, max: MAX_HANDSHAKE_FRAME_BYTES });
        // A Hello fits; after the handshake so does a large batch.
        let mut dec = FrameDecoder::before_handshake();
        dec.push(&encode(&hello()).unwrap());
        assert_eq!(dec.pop::<FromEngine>().unwrap(), Some(hello()));
        dec.set_max_frame(MAX_FRAME_BYTES);
        let big = batch((0..10_000).map(|i| output(i, 0)).collect());
        dec.push(&encode(&big).unwrap());
        assert_eq!(dec.pop::<FromEngine>().unwrap(), Some(big));
    }

    #[test]
    fn each_kind_is_refused_over_its_bound_as_soon_as_its_head_arrives() {
        // (head of the payload, kind, bound): a length one over the bound, and
        // nothing of the payload beyond its kind.
        let heads: [(&[u8], &str, usize); 3] = [
            (&[CODEC_VERSION, 0], "Welcome", MAX_HANDSHAKE_FRAME_BYTES),
            (&[CODEC_VERSION, 1, 1], "Abort", MAX_ABORT_FRAME_BYTES),
            (&[CODEC_VERSION, 1, 2], "Shutdown", MAX_SHUTDOWN_FRAME_BYTES),
        ];
        for (head, kind, max) in heads {
            let mut dec = FrameDecoder::new();
            dec.push(&(max as u32 + 1).to_be_bytes());
            dec.push(head);
            assert_eq!(dec.pop::<ToEngine>().unwrap_err(), CodecError::MessageTooLarge { kind, len: max + 1, max });
        }
        let mut dec = FrameDecoder::new();
        dec.push(&(MAX_HANDSHAKE_FRAME_BYTES as u32 + 1).to_be_bytes());
        dec.push(&[CODEC_VERSION, 0]);
        assert!(matches!(dec.pop::<FromEngine>().unwrap_err(), CodecError::MessageTooLarge { kind: "Hello", .. }));
        // The unbounded kinds wait for their bytes.
        let mut dec = FrameDecoder::new();
        dec.push(&(MAX_FRAME_BYTES as u32).to_be_bytes());
        dec.push(&[CODEC_VERSION, 1, 0]);
        assert_eq!(dec.pop::<ToEngine>(), Ok(None));
        // An unknown kind is refused at once.
        let mut dec = FrameDecoder::new();
        dec.push(&(MAX_FRAME_BYTES as u32).to_be_bytes());
        dec.push(&[CODEC_VERSION, 9]);
        assert!(matches!(dec.pop::<ToEngine>(), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn a_declared_length_reserves_nothing_the_bytes_grow_the_buffer() {
        let mut dec = FrameDecoder::new();
        dec.push(&(MAX_FRAME_BYTES as u32).to_be_bytes());
        dec.push(&[CODEC_VERSION, 1, 0]);
        assert_eq!(dec.pop::<ToEngine>(), Ok(None));
        assert!(dec.capacity() < 1024, "{} bytes held for 7 that arrived", dec.capacity());
        for _ in 0..16 {
            dec.push(&[0u8; 1024]);
            assert_eq!(dec.pop::<ToEngine>(), Ok(None));
        }
        assert!(dec.capacity() <= 64 << 10, "{}", dec.capacity());
    }

    #[test]
    fn a_frame_arriving_in_pieces_takes_no_more_than_its_size() {
        let big = encode(&add(1, 3 << 20)).unwrap();
        let mut dec = FrameDecoder::new();
        for piece in big.chunks(READ_CHUNK_FOR_TESTS) {
            dec.push(piece);
            assert!(dec.capacity() <= big.len().max(2 * dec.buffered()), "{} for {} of {}", dec.capacity(), dec.buffered(), big.len());
        }
        assert_eq!(dec.capacity(), big.len());
        assert!(matches!(dec.pop::<ToEngine>(), Ok(Some(_))));
    }

    const READ_CHUNK_FOR_TESTS: usize = 64 << 10;

    #[test]
    fn a_large_frame_leaves_no_large_buffer_behind() {
        let mut dec = FrameDecoder::new();
        let big = add(1, 1 << 20);
        dec.push(&encode(&big).unwrap());
        assert_eq!(dec.pop::<ToEngine>().unwrap(), Some(big));
        dec.push(&encode(&add(2, 1)).unwrap());
        assert!(dec.capacity() <= IDLE_BUFFER_BYTES, "{}", dec.capacity());
        assert_eq!(dec.pop::<ToEngine>().unwrap(), Some(add(2, 1)));
    }

    /// Every vector with a bound is refused one element over it, while decoding.
    #[test]
    fn each_bounded_vector_is_refused_over_its_bound() {
        let refused_cmd = |msg: &ToEngine| {
            let mut dec = FrameDecoder::new();
            dec.push(&raw(msg));
            dec.pop::<ToEngine>()
        };
        assert_eq!(refused_cmd(&abort(MAX_ABORT_IDS)).unwrap(), Some(abort(MAX_ABORT_IDS)));
        let over = refused_cmd(&abort(MAX_ABORT_IDS + 1)).unwrap_err();
        assert!(matches!(&over, CodecError::Malformed(m) if m.contains("over its bound of 65536")), "{over}");
        let choices = |n: usize| {
            let c = Constraint::Choice(vec![String::new(); n]);
            ToEngine::Command(EngineCommand::Add(Box::new(EngineRequest::new(1, vec![1], SamplingParams { constraint: Some(c), ..Default::default() }))))
        };
        assert!(refused_cmd(&choices(MAX_CONSTRAINT_BYTES)).is_ok());
        assert!(matches!(refused_cmd(&choices(MAX_CONSTRAINT_BYTES + 1)), Err(CodecError::Malformed(_))));

        let read = |msg: &FromEngine| {
            let mut dec = FrameDecoder::new();
            dec.push(&raw(msg));
            dec.pop::<FromEngine>()
        };
        let with = |f: &dyn Fn(&mut EngineOutputs)| {
            let FromEngine::Outputs(mut o) = batch(vec![output(1, 0)]) else { unreachable!() };
            f(&mut o);
            FromEngine::Outputs(o)
        };
        let lp = |top: usize| TokenLogprob { token: 1, logprob: -1.0, rank: 1, top: vec![(1, -1.0); top] };
        type Make = Box<dyn Fn(usize) -> FromEngine>;
        let cases: Vec<(&str, Make, usize)> = vec![
            ("outputs", Box::new(|n| batch(vec![output(1, 0); n])), MAX_OUTPUTS_PER_BATCH),
            ("new tokens", Box::new(move |n| with(&|o| o.outputs[0].new_tokens = vec![1; n])), MAX_TOKENS_PER_OUTPUT),
            ("logprobs", Box::new(move |n| with(&|o| o.outputs[0].logprobs = Some(vec![lp(0); n]))), MAX_TOKENS_PER_OUTPUT),
            ("top logprobs", Box::new(move |n| with(&|o| o.outputs[0].logprobs = Some(vec![lp(n)]))), MAX_LOGPROBS as usize),
            (
                "prompt top logprobs",
                Box::new(move |n| with(&|o| o.outputs[0].prompt_logprobs = Some(vec![lp(n)]))),
                MAX_LOGPROBS as usize,
            ),
            ("step reports", Box::new(move |n| with(&|o| o.stats.step_tokens = vec![1; n])), MAX_STEP_REPORTS),
            ("KV events", Box::new(move |n| with(&|o| o.kv_events = vec![KvEvent::Cleared; n])), MAX_KV_EVENTS),
        ];
        for (what, make, bound) in cases {
            assert_eq!(read(&make(bound)).unwrap(), Some(make(bound)), "{what} at its bound");
            assert!(matches!(read(&make(bound + 1)), Err(CodecError::Malformed(_))), "{what} over its bound");
        }
    }

    #[test]
    fn a_long_abort_and_a_large_batch_are_split_and_the_parts_fit() {
        let parts = split_command(abort(2 * MAX_ABORT_IDS + 1));
        assert_eq!(parts.len(), 3);
        let ids: Vec<u64> = parts
            .iter()
            .flat_map(|p| match p {
                ToEngine::Command(EngineCommand::Abort(ids)) => ids.clone(),
                _ => panic!("{p:?}"),
            })
            .collect();
        assert_eq!(ids, (0..2 * MAX_ABORT_IDS as u64 + 1).collect::<Vec<_>>());
        assert!(parts.iter().all(|p| encode(p).is_ok()));
        // Unsplit, the receiver would refuse it.
        let mut dec = FrameDecoder::new();
        dec.push(&encode(&abort(MAX_ABORT_IDS + 1)).unwrap());
        assert!(matches!(dec.pop::<ToEngine>(), Err(CodecError::Malformed(_))));
        assert_eq!(split_command(abort(3)), vec![abort(3)]);

        // Requests of n = 100: one output per completion, interleaved.
        let outputs: Vec<TokenOutput> = (0..100).flat_map(|index| (0..1000).map(move |id| output(id, index))).collect();
        let stats = EngineStats { step_tokens: vec![7], ..EngineStats::default() };
        let msg = FromEngine::Outputs(EngineOutputs { rank: 3, outputs: outputs.clone(), stats, kv_events: vec![KvEvent::Cleared] });
        let parts = split_outputs(msg);
        assert!(parts.len() >= 2);
        let mut seen: Vec<TokenOutput> = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let FromEngine::Outputs(o) = p else { panic!() };
            assert!(o.outputs.len() <= MAX_OUTPUTS_PER_BATCH && o.rank == 3);
            assert_eq!(o.kv_events.len(), usize::from(i == 0), "KV events ride on the first batch");
            assert_eq!(o.stats.step_tokens.len(), usize::from(i == 0));
            // A request lies in one batch only.
            let earlier: std::collections::HashSet<u64> = seen.iter().map(|s| s.id).collect();
            assert!(o.outputs.iter().all(|x| !earlier.contains(&x.id)), "a request in two batches");
            seen.extend(o.outputs.iter().cloned());
            assert!(encode(p).is_ok());
        }
        // Nothing lost, and each request's outputs in their order.
        for id in [0u64, 517, 999] {
            let mine = |v: &[TokenOutput]| v.iter().filter(|o| o.id == id).map(|o| o.index).collect::<Vec<_>>();
            assert_eq!(mine(&seen), mine(&outputs));
        }
        assert_eq!(seen.len(), outputs.len());
    }

    #[test]
    fn unknown_version_malformed_and_trailing_bytes_are_errors() {
        let mut frame = encode(&add(1, 2)).unwrap();
        frame[4] = CODEC_VERSION + 1;
        let mut dec = FrameDecoder::new();
        dec.push(&frame);
        assert_eq!(
            dec.pop::<ToEngine>().unwrap_err(),
            CodecError::UnknownVersion { got: CODEC_VERSION + 1, expected: CODEC_VERSION }
        );

        // A variant tag no message has.
        let mut dec = FrameDecoder::new();
        dec.push(&[0, 0, 0, 2, CODEC_VERSION, 0x7f]);
        assert!(matches!(dec.pop::<ToEngine>(), Err(CodecError::Malformed(_))));

        // A valid message followed by a stray byte inside the same frame.
        let frame = encode(&ToEngine::Command(EngineCommand::Shutdown)).unwrap();
        let mut payload = frame[4..].to_vec();
        payload.push(0);
        let mut dec = FrameDecoder::new();
        dec.push(&(payload.len() as u32).to_be_bytes());
        dec.push(&payload);
        assert_eq!(dec.pop::<ToEngine>().unwrap_err(), CodecError::TrailingBytes(1));

        let mut dec = FrameDecoder::new();
        dec.push(&[0, 0, 0, 0]);
        assert_eq!(dec.pop::<ToEngine>().unwrap_err(), CodecError::EmptyFrame);
    }
}
