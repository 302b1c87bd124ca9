//! The wire codec of the QUIC link: versioned postcard messages in
//! length-delimited frames. Sans-IO: bytes in, messages out, no sockets.
//!
//! ```text
//! frame   = len: u32 big-endian | payload (len bytes)
//! payload = CODEC_VERSION: u8   | postcard bytes of one ToEngine or FromEngine
//! ```
//!
//! Everything read off the wire is untrusted: a length is checked against
//! [`MAX_FRAME_BYTES`] before anything of that size is allocated, a version byte
//! this build does not speak is refused, and a payload must decode to exactly one
//! message (no trailing bytes). Errors, never panics.

use serde::de::DeserializeOwned;
use serde::Serialize;

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

/// Bytes of the length prefix.
const LEN_BYTES: usize = 4;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("empty frame: no codec version byte")]
    EmptyFrame,
    #[error("codec version {got} is not spoken here (this build speaks {expected})")]
    UnknownVersion { got: u8, expected: u8 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the message in its frame")]
    TrailingBytes(usize),
    #[error("message could not be encoded: {0}")]
    Encode(String),
}

/// One message as a complete frame, ready to write. Refuses to produce a frame
/// the other side would refuse.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    // Serialize behind a placeholder prefix so the frame is built in one buffer.
    let mut frame = vec![0u8; LEN_BYTES];
    frame.push(CODEC_VERSION);
    let mut frame = postcard::to_extend(msg, frame).map_err(|e| CodecError::Encode(e.to_string()))?;
    let len = frame.len() - LEN_BYTES;
    if len > MAX_FRAME_BYTES {
        return Err(CodecError::FrameTooLarge { len, max: MAX_FRAME_BYTES });
    }
    // len <= MAX_FRAME_BYTES < u32::MAX, so the cast is exact.
    frame[..LEN_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Decodes one payload (version byte + postcard bytes) into a message.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = payload.split_first().ok_or(CodecError::EmptyFrame)?;
    if version != CODEC_VERSION {
        return Err(CodecError::UnknownVersion { got: version, expected: CODEC_VERSION });
    }
    // postcard allocates only as it consumes input (serde caps what a length
    // prefix may preallocate at 1 MiB), so memory stays proportional to the
    // bounded payload. Small elements do expand: an output batch of empty
    // TokenOutputs (6 bytes each on the wire, ~100 in memory) is the worst case.
    // `kv_events`, tiny on the wire, is cut off at its bound while decoding.
    let (msg, rest) = postcard::take_from_bytes::<T>(body).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Incremental frame decoder: push bytes as they arrive, pop complete frames.
///
/// After an error the stream is out of sync for good; the decoder keeps
/// returning that error.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as frames (compacted on the next push,
    /// so popping many small frames costs no quadratic moves).
    start: usize,
    failed: Option<CodecError>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read off the wire. The caller reads in bounded chunks and
    /// pops after each push, so the buffer holds at most one frame plus a chunk.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete payload (version byte + message bytes), if one has
    /// fully arrived. Never longer than [`MAX_FRAME_BYTES`].
    pub fn pop_payload(&mut self) -> Result<Option<&[u8]>, CodecError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let avail = &self.buf[self.start..];
        let Some(prefix) = avail.get(..LEN_BYTES) else { return Ok(None) };
        let mut len_be = [0u8; LEN_BYTES];
        len_be.copy_from_slice(prefix);
        let len = u32::from_be_bytes(len_be) as usize;
        // Checked before waiting for (let alone allocating) that many bytes.
        if len > MAX_FRAME_BYTES {
            return Err(self.fail(CodecError::FrameTooLarge { len, max: MAX_FRAME_BYTES }));
        }
        if len == 0 {
            return Err(self.fail(CodecError::EmptyFrame));
        }
        if avail.len() < LEN_BYTES + len {
            // Reserve what the rest of this frame needs (bounded by the check above)
            // so a large frame is not copied over and over as it arrives.
            self.buf.reserve(LEN_BYTES + len - avail.len());
            return Ok(None);
        }
        let from = self.start + LEN_BYTES;
        self.start = from + len;
        Ok(Some(&self.buf[from..from + len]))
    }

    /// The next complete message, if one has fully arrived.
    pub fn pop<T: DeserializeOwned>(&mut self) -> Result<Option<T>, CodecError> {
        let decoded = match self.pop_payload()? {
            None => return Ok(None),
            Some(payload) => decode_payload::<T>(payload),
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
        ToEngine::Command(EngineCommand::Add(EngineRequest::new(id, (0..prompt_len as u32).collect(), SamplingParams::default())))
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
        let big = ToEngine::Command(EngineCommand::Add(EngineRequest::new(1, vec![u32::MAX; MAX_FRAME_BYTES / 4], SamplingParams::default())));
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
