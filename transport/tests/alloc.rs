//! What reading frames costs in memory, counted by the allocator: a length a
//! peer claims reserves nothing of its size, a frame read before the handshake
//! costs under a mebibyte whatever it holds, and a full-size frame a small
//! multiple of itself.

use std::sync::{Mutex, MutexGuard};

use ferry_transport::codec::{self, CodecError, FrameDecoder, CODEC_VERSION, MAX_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES};
use ferry_transport::*;
use peak_alloc::PeakAlloc;

/// Counts the bytes allocated and not freed, and their peak (a maintained
/// counting allocator: the transport crate forbids unsafe code, tests too).
#[global_allocator]
static COUNTING: PeakAlloc = PeakAlloc;

/// The counts are for the whole process, so the tests take turns: a test
/// running beside another would count the other's allocations. Each test
/// holds its turn from its first line.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn my_turn() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The most bytes `f` had allocated at once, beyond what was live before it.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    COUNTING.reset_peak_usage();
    let base = COUNTING.current_usage();
    let out = f();
    (out, COUNTING.peak_usage().saturating_sub(base))
}

/// Pushes `wire` into a decoder with frames of at most `max_frame`, in read-sized
/// chunks as the link does, and pops after each; the first message or error.
fn read<T: codec::Message>(wire: &[u8], max_frame: usize) -> Result<Option<T>, CodecError> {
    let mut dec = FrameDecoder::new();
    dec.set_max_frame(max_frame);
    for chunk in wire.chunks(64 << 10) {
        dec.push(chunk);
        match dec.pop::<T>() {
            Ok(None) => continue,
            done => return done,
        }
    }
    Ok(None)
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// An output batch's payload: `n` outputs claimed, then the bytes of `body`.
fn outputs_claiming(n: u32, body: &[u8]) -> Vec<u8> {
    // Outputs (1), rank 0, then the outputs' length as a varint.
    let mut p = vec![CODEC_VERSION, 1, 0];
    let mut n = n;
    while n >= 0x80 {
        p.push((n as u8) | 0x80);
        n >>= 7;
    }
    p.push(n as u8);
    p.extend_from_slice(body);
    p
}

/// Empty stats (7 varints, an f32, a bool, no step reports, speculative
/// totals of 3 varints and no positions) and no KV events.
const EMPTY_TAIL: [u8; 17] = [0; 17];

/// The smallest output on the wire: 8 bytes, 136 in memory.
const EMPTY_OUTPUT: [u8; 8] = [1, 0, 0, 0, 0, 0, 0, 0];

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

#[test]
fn a_claimed_length_in_a_small_frame_allocates_nothing_of_its_size() {
    let _turn = my_turn();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Abort claiming u32::MAX ids (32 GiB as u64s), none following.
        ("abort", vec![CODEC_VERSION, 1, 1, 0xff, 0xff, 0xff, 0xff, 0x0f]),
        // Add claiming u32::MAX prompt tokens (16 GiB), none following.
        ("prompt", vec![CODEC_VERSION, 1, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]),
    ];
    for (what, payload) in cases {
        let wire = frame(&payload);
        let (got, peak) = peak_of(|| read::<ToEngine>(&wire, MAX_FRAME_BYTES));
        assert!(matches!(got, Err(CodecError::Malformed(_))), "{what}: {got:?}");
        // A vector reserves at most 64 KiB beyond what its frame's budget allows.
        assert!(peak <= 80 * KIB, "{what}: {peak} bytes for a {}-byte frame", wire.len());
    }
    for claimed in [MAX_OUTPUTS_PER_BATCH as u32, u32::MAX] {
        let wire = frame(&outputs_claiming(claimed, &[]));
        let (got, peak) = peak_of(|| read::<FromEngine>(&wire, MAX_FRAME_BYTES));
        assert!(matches!(got, Err(CodecError::Malformed(_))), "{got:?}");
        // A bounded vector reserves at most 64 KiB before its elements arrive.
        assert!(peak <= 80 * KIB, "{claimed} outputs claimed: {peak} bytes");
    }
}

#[test]
fn a_frame_before_the_handshake_costs_under_a_mebibyte() {
    let _turn = my_turn();
    // The most expanding message that fits: a batch of empty outputs.
    let n = (MAX_HANDSHAKE_FRAME_BYTES - 32) / EMPTY_OUTPUT.len();
    let mut payload = outputs_claiming(n as u32, &EMPTY_OUTPUT.repeat(n));
    payload.extend_from_slice(&EMPTY_TAIL);
    let wire = frame(&payload);
    assert!(payload.len() <= MAX_HANDSHAKE_FRAME_BYTES);
    let (got, peak) = peak_of(|| read::<FromEngine>(&wire, MAX_HANDSHAKE_FRAME_BYTES));
    assert!(matches!(got, Ok(Some(FromEngine::Outputs(ref o))) if o.outputs.len() == n), "{got:?}");
    assert!(peak < MIB, "{peak} bytes");
    // One byte more is refused on its length, before its bytes are read.
    let mut over = (MAX_HANDSHAKE_FRAME_BYTES as u32 + 1).to_be_bytes().to_vec();
    over.extend_from_slice(&[CODEC_VERSION, 1]);
    let (got, peak) = peak_of(|| read::<FromEngine>(&over, MAX_HANDSHAKE_FRAME_BYTES));
    assert!(matches!(got, Err(CodecError::FrameTooLarge { .. })));
    assert!(peak < 4 * KIB, "{peak}");
}

/// A full-size batch of empty outputs (the most expanding message: 17 times
/// its bytes as decoded, so 270 MiB, and twice that with the vector's growth,
/// before the bound) is cut off at `MAX_OUTPUTS_PER_BATCH`: the frame's buffer
/// and 65,536 outputs at most.
#[test]
fn a_full_size_frame_of_the_most_expanding_kind_costs_a_small_multiple_of_itself() {
    let _turn = my_turn();
    let n = (MAX_FRAME_BYTES - 16) / EMPTY_OUTPUT.len();
    let wire = frame(&outputs_claiming(n as u32, &EMPTY_OUTPUT.repeat(n)));
    let (got, peak) = peak_of(|| read::<FromEngine>(&wire, MAX_FRAME_BYTES));
    assert!(matches!(got, Err(CodecError::Malformed(ref m)) if m.contains("over its bound of 65536")), "{got:?}");
    eprintln!("a {:.1} MiB frame of empty outputs: peak {:.1} MiB", mib(wire.len()), mib(peak));
    assert!(peak <= 2 * MAX_FRAME_BYTES, "{peak} bytes for a {}-byte frame", wire.len());
}

/// The uncapped worst case: prompt logprobs (40 bytes each in memory, 7 on the
/// wire), reserved once at their claimed length: the frame's buffer and 5.7
/// times it, within the 6 bytes per byte `codec.rs` states.
#[test]
fn a_full_size_frame_of_prompt_logprobs_stays_within_the_stated_bound() {
    let _turn = my_turn();
    let entries = (MAX_FRAME_BYTES - 64) / 7;
    // One output: id 0, index 0, no tokens, no logprobs, no finish, 0 cached,
    // Some(prompt logprobs) of `entries` × (token 0, logprob 0.0, rank 0, top []).
    let mut body = vec![0, 0, 0, 0, 0, 0, 1];
    let mut n = entries as u32;
    while n >= 0x80 {
        body.push((n as u8) | 0x80);
        n >>= 7;
    }
    body.push(n as u8);
    for _ in 0..entries {
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
    }
    body.push(0); // No timing.
    let mut payload = outputs_claiming(1, &body);
    payload.extend_from_slice(&EMPTY_TAIL);
    let wire = frame(&payload);
    let (got, peak) = peak_of(|| read::<FromEngine>(&wire, MAX_FRAME_BYTES));
    assert!(matches!(got, Ok(Some(_))), "{got:?}");
    eprintln!("a {:.1} MiB frame of prompt logprobs: peak {:.1} MiB", mib(wire.len()), mib(peak));
    assert!(peak <= 7 * wire.len(), "{peak} bytes for a {}-byte frame", wire.len());
}

/// A large honest prompt is reserved once, at its size: no doubling.
#[test]
fn a_large_prompt_is_allocated_once() {
    let _turn = my_turn();
    let prompt: Vec<u32> = (0..2_000_000u32).map(|i| i % 100).collect();
    let add = ToEngine::Command(EngineCommand::Add(Box::new(EngineRequest::new(1, prompt, SamplingParams::default()))));
    let wire = codec::encode(&add).unwrap();
    let (got, peak) = peak_of(|| read::<ToEngine>(&wire, MAX_FRAME_BYTES));
    assert_eq!(got.unwrap().unwrap(), add);
    eprintln!("a {:.1} MiB Add of 2M tokens (7.6 MiB as u32s): peak {:.1} MiB", mib(wire.len()), mib(peak));
    assert!(peak <= wire.len() + 2_000_000 * 4 + 128 * KIB, "{peak}");
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / MIB as f64
}
