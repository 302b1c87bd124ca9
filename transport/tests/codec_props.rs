//! Property tests of the wire codec: whatever bytes arrive, the decoder neither
//! panics nor hands out an over-limit frame, and every message survives a
//! round trip. Case counts are bounded so CI runs this in seconds.

use ferry_transport::codec::{encode, CodecError, FrameDecoder, MAX_FRAME_BYTES};
use ferry_transport::*;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

fn f32s() -> impl Strategy<Value = f32> {
    // Finite, so PartialEq holds after the round trip (NaN != NaN).
    -1.0e6f32..1.0e6f32
}

fn sampling() -> impl Strategy<Value = SamplingParams> {
    (
        (any::<u32>(), f32s(), f32s(), any::<i32>(), f32s(), f32s(), f32s()),
        (f32s(), option::of(any::<u64>()), any::<u32>(), any::<u32>(), vec(any::<u32>(), 0..8)),
        (any::<bool>(), option::of(any::<u32>()), option::of(constraint()), any::<i64>()),
    )
        .prop_map(|((n, temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty), b, c)| {
            let (frequency_penalty, seed, max_tokens, min_tokens, stop_token_ids) = b;
            let (ignore_eos, logprobs, constraint, priority) = c;
            let logit_bias = stop_token_ids.iter().map(|&t| (t, -1.5)).collect();
            SamplingParams {
                n,
                temperature,
                top_p,
                top_k,
                min_p,
                repetition_penalty,
                presence_penalty,
                frequency_penalty,
                seed,
                max_tokens,
                min_tokens,
                stop_token_ids,
                ignore_eos,
                logprobs,
                prompt_logprobs: logprobs,
                logit_bias,
                constraint,
                priority,
            }
        })
}

fn constraint() -> impl Strategy<Value = Constraint> {
    prop_oneof![
        ".{0,40}".prop_map(Constraint::JsonSchema),
        Just(Constraint::JsonObject),
        ".{0,40}".prop_map(Constraint::Regex),
        vec(".{0,10}", 0..4).prop_map(Constraint::Choice),
        ".{0,40}".prop_map(Constraint::Lark),
    ]
}

fn to_engine() -> impl Strategy<Value = ToEngine> {
    prop_oneof![
        (any::<u32>(), any::<bool>(), option::of(".{0,40}"), any::<u32>()).prop_map(|(protocol_version, accepted, reason, rank)| {
            ToEngine::Welcome(Welcome { protocol_version, accepted, reason, rank, retry: false })
        }),
        (any::<u64>(), vec(any::<u32>(), 0..300), sampling(), option::of((any::<u32>(), vec(any::<u32>(), 0..50)))).prop_map(
            |(id, prompt_tokens, sampling, resume)| {
                let resume = resume.map(|(index, output_tokens)| Resume { index, output_tokens });
                ToEngine::Command(EngineCommand::Add(EngineRequest { id, prompt_tokens, sampling, resume }))
            }
        ),
        vec(any::<u64>(), 0..20).prop_map(|ids| ToEngine::Command(EngineCommand::Abort(ids))),
        Just(ToEngine::Command(EngineCommand::Shutdown)),
    ]
}

fn finish() -> impl Strategy<Value = FinishReason> {
    let kind = prop_oneof![Just(ErrorKind::InvalidRequest), Just(ErrorKind::Capacity), Just(ErrorKind::Internal)];
    prop_oneof![
        Just(FinishReason::Stop),
        Just(FinishReason::Length),
        Just(FinishReason::Abort),
        (kind, ".{0,40}").prop_map(|(kind, message)| FinishReason::Error(EngineError { kind, message })),
    ]
}

fn token_output() -> impl Strategy<Value = TokenOutput> {
    let logprob = (any::<u32>(), f32s(), vec((any::<u32>(), f32s()), 0..5))
        .prop_map(|(token, logprob, top)| TokenLogprob { token, logprob, rank: 1, top });
    (any::<u64>(), any::<u32>(), vec(any::<u32>(), 0..10), option::of(vec(logprob, 0..4)), option::of(finish()), any::<u32>())
        .prop_map(|(id, index, new_tokens, logprobs, finish, num_cached_tokens)| TokenOutput {
            id,
            index,
            new_tokens,
            logprobs,
            finish,
            num_cached_tokens,
            prompt_logprobs: None,
            timing: None,
        })
}

fn from_engine() -> impl Strategy<Value = FromEngine> {
    let stats = (any::<u32>(), any::<u32>(), f32s(), any::<u64>(), any::<u64>(), any::<u64>(), any::<(u64, bool)>()).prop_map(
        |(num_waiting, num_running, kv_usage, num_preemptions, prefix_cache_queries, prefix_cache_hits, (num_added, draining))| {
            let step_tokens = vec![num_running; (num_waiting % 5) as usize];
            EngineStats { num_waiting, num_running, kv_usage, num_preemptions, prefix_cache_queries, prefix_cache_hits, num_added, draining, step_tokens, spec: Default::default() }
        },
    );
    let hello = (any::<u32>(), any::<u32>(), ".{0,20}", any::<(u64, u64)>(), any::<[u32; 4]>()).prop_map(
        |(protocol_version, rank, model, (config, tensors), [vocab_size, max_model_len, num_kv_blocks, block_size])| {
            FromEngine::Hello(Hello {
                protocol_version,
                rank,
                model,
                fingerprint: ModelFingerprint { config, tensors },
                vocab_size,
                max_model_len,
                num_kv_blocks,
                block_size,
                node: "n".into(),
            })
        },
    );
    let kv_event = prop_oneof![Just(KvEvent::Cleared), any::<u64>().prop_map(KvEvent::Stored), any::<u64>().prop_map(KvEvent::Removed)];
    prop_oneof![
        hello,
        (any::<u32>(), vec(token_output(), 0..6), stats, vec(kv_event, 0..8))
            .prop_map(|(rank, outputs, stats, kv_events)| FromEngine::Outputs(EngineOutputs { rank, outputs, stats, kv_events })),
    ]
}

/// Pushes `bytes` in `chunk`-sized pieces, popping everything after each push.
/// Returns how many frames came out; asserts none is over the limit.
fn drain(bytes: &[u8], chunk: usize) -> usize {
    let mut dec = FrameDecoder::new();
    let mut frames = 0;
    for piece in bytes.chunks(chunk.max(1)) {
        dec.push(piece);
        loop {
            match dec.pop_payload() {
                Ok(Some(p)) => {
                    assert!(p.len() <= MAX_FRAME_BYTES);
                    frames += 1;
                }
                Ok(None) => break,
                Err(_) => return frames,
            }
        }
    }
    frames
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..2048), chunk in 1usize..64) {
        drain(&bytes, chunk);
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        while let Ok(Some(_)) = dec.pop::<ToEngine>() {}
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        while let Ok(Some(_)) = dec.pop::<FromEngine>() {}
    }

    /// Small length prefixes, so frames complete and the payload parser is exercised.
    #[test]
    fn arbitrary_payloads_never_panic(frames in vec(vec(any::<u8>(), 0..200), 1..8)) {
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend((f.len() as u32).to_be_bytes());
            wire.extend(f);
        }
        let mut dec = FrameDecoder::new();
        dec.push(&wire);
        while let Ok(Some(_)) = dec.pop::<FromEngine>() {}
        let mut dec = FrameDecoder::new();
        dec.push(&wire);
        while let Ok(Some(_)) = dec.pop::<ToEngine>() {}
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        msg in from_engine(),
        cmd in to_engine(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        chunk in 1usize..512,
    ) {
        for mut wire in [encode(&msg).unwrap(), encode(&cmd).unwrap()] {
            for (at, byte) in &flips {
                let i = at.index(wire.len());
                wire[i] = *byte;
            }
            drain(&wire, chunk);
            let mut dec = FrameDecoder::new();
            dec.push(&wire);
            let _ = dec.pop::<FromEngine>();
            let mut dec = FrameDecoder::new();
            dec.push(&wire);
            let _ = dec.pop::<ToEngine>();
        }
    }

    #[test]
    fn over_limit_lengths_are_refused(len in (MAX_FRAME_BYTES as u32 + 1)..=u32::MAX, tail in vec(any::<u8>(), 0..64)) {
        let mut dec = FrameDecoder::new();
        dec.push(&len.to_be_bytes());
        dec.push(&tail);
        let refused = matches!(dec.pop_payload(), Err(CodecError::FrameTooLarge { .. }));
        prop_assert!(refused, "length {} accepted", len);
    }

    #[test]
    fn messages_round_trip(outs in vec(from_engine(), 1..4), cmds in vec(to_engine(), 1..4), chunk in 1usize..256) {
        let wire: Vec<u8> = outs.iter().flat_map(|m| encode(m).unwrap()).collect();
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in wire.chunks(chunk) {
            dec.push(piece);
            while let Some(m) = dec.pop::<FromEngine>().unwrap() {
                got.push(m);
            }
        }
        prop_assert_eq!(got, outs);

        let wire: Vec<u8> = cmds.iter().flat_map(|m| encode(m).unwrap()).collect();
        let mut dec = FrameDecoder::new();
        dec.push(&wire);
        let mut got = Vec::new();
        while let Some(m) = dec.pop::<ToEngine>().unwrap() {
            got.push(m);
        }
        prop_assert_eq!(got, cmds);
        prop_assert_eq!(dec.buffered(), 0);
    }
}
