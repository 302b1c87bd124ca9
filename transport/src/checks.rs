//! What a well-behaved peer may say, checked on every message read off the wire.
//! Sans-IO: the QUIC link feeds these structs what it sends and receives and
//! closes the link on the first [`LinkViolation`]. The flume link skips them: its
//! peer is in the same process, and trusted.
//!
//! The decoder already guarantees a message is well formed; these checks make
//! sure its numbers are ones the gateway can index with: the rank it said hello
//! as, token ids below its vocabulary, request ids and completion indices the
//! gateway actually handed it.

use std::collections::HashMap;

use crate::codec::{MAX_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES};
use crate::*;

/// A peer broke the link's rules; the link closes with this message.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("link violation: {0}")]
pub struct LinkViolation(pub String);

fn violation(msg: impl Into<String>) -> Result<(), LinkViolation> {
    Err(LinkViolation(msg.into()))
}

/// What the gateway knows of the rank once it said hello.
#[derive(Debug, Clone, Copy)]
struct Said {
    rank: u32,
    vocab_size: u32,
}

/// A request sent on this link whose completions have not all finished.
#[derive(Debug, Clone, Copy)]
struct Live {
    /// The completion indices outputs may carry: `first..first + n`. A new
    /// request has `sampling.n` completions from 0; a resumed one has one,
    /// the index it resumes.
    first: u32,
    n: u32,
    /// Completions not finished yet.
    open: u32,
    /// Prompt logprob entries the request may get back: prompt length - 1
    /// when it asked for them, else 0.
    prompt_entries: usize,
}

/// The gateway's checks of one link: feed it every command sent and every
/// message received.
#[derive(Debug, Default)]
pub struct GatewayChecks {
    hello: Option<Said>,
    /// The gateway accepted the rank's Hello (it sent an accepting Welcome):
    /// from then on the rank may send frames of any size up to the limit.
    welcomed: bool,
    /// Requests still running on this rank. An entry goes when its last
    /// completion finishes, so memory follows the rank's load, not its history.
    live: HashMap<RequestId, Live>,
}

impl GatewayChecks {
    /// The checks of a new link: no Hello yet, nothing sent.
    pub fn new() -> Self {
        Self::default()
    }

    /// The largest frame the gateway reads from this rank now: a handshake's
    /// until it accepted the rank's Hello, so a peer it has not accepted costs
    /// it little memory whatever it sends.
    pub fn max_frame(&self) -> usize {
        if self.welcomed {
            MAX_FRAME_BYTES
        } else {
            MAX_HANDSHAKE_FRAME_BYTES
        }
    }

    /// Records a command the gateway is about to send.
    pub fn on_send(&mut self, msg: &ToEngine) {
        if let ToEngine::Welcome(w) = msg {
            self.welcomed |= w.accepted;
            // A rank that asked for a number (AUTO_RANK) speaks as the one given.
            if let (true, Some(said)) = (w.accepted, self.hello.as_mut()) {
                said.rank = w.rank;
            }
        }
        if let ToEngine::Command(EngineCommand::Add(req)) = msg {
            let (first, n) = match &req.resume {
                Some(r) => (r.index, 1),
                None => (0, req.sampling.n.max(1)),
            };
            let asks_prompt_logprobs = req.sampling.prompt_logprobs.is_some() && req.resume.is_none();
            let prompt_entries = if asks_prompt_logprobs { req.prompt_tokens.len().saturating_sub(1) } else { 0 };
            self.live.insert(req.id, Live { first, n, open: n, prompt_entries });
        }
    }

    /// Checks a message received from the engine.
    pub fn on_recv(&mut self, msg: &FromEngine) -> Result<(), LinkViolation> {
        match msg {
            FromEngine::Hello(h) => {
                if self.hello.is_some() {
                    return violation(format!("a second Hello (rank {}) on a link that already said hello", h.rank));
                }
                self.hello = Some(Said { rank: h.rank, vocab_size: h.vocab_size });
                Ok(())
            }
            FromEngine::Outputs(o) => {
                let Some(said) = self.hello else {
                    return violation("outputs before Hello");
                };
                self.check_outputs(said, o)
            }
        }
    }

    fn check_outputs(&mut self, said: Said, o: &EngineOutputs) -> Result<(), LinkViolation> {
        if o.rank != said.rank {
            return violation(format!("outputs from rank {} on the link of rank {}", o.rank, said.rank));
        }
        if o.stats.step_tokens.len() > MAX_STEP_REPORTS {
            return violation(format!("{} step reports in one batch, more than {MAX_STEP_REPORTS}", o.stats.step_tokens.len()));
        }
        if o.kv_events.len() > MAX_KV_EVENTS {
            return violation(format!("{} KV events in one batch, more than {MAX_KV_EVENTS}", o.kv_events.len()));
        }
        let token = |t: u32, what: &str| -> Result<(), LinkViolation> {
            if t >= said.vocab_size {
                return violation(format!("{what} token id {t} is out of the vocabulary (size {})", said.vocab_size));
            }
            Ok(())
        };
        // Validate the whole batch before changing any state: a bad batch
        // closes the link, a good one is applied as a unit.
        for out in &o.outputs {
            let Some(live) = self.live.get(&out.id) else {
                return violation(format!("output for request {} that was never sent on this link or has finished", out.id));
            };
            if !(live.first..live.first + live.n).contains(&out.index) {
                return violation(format!(
                    "output for completion {} of request {}, which asked for completions {}..{}",
                    out.index,
                    out.id,
                    live.first,
                    live.first + live.n
                ));
            }
            for &t in &out.new_tokens {
                token(t, "sampled")?;
            }
            if let Some(plps) = &out.prompt_logprobs {
                if plps.len() > live.prompt_entries {
                    return violation(format!(
                        "request {}: {} prompt logprob entries where at most {} may come",
                        out.id,
                        plps.len(),
                        live.prompt_entries
                    ));
                }
                for lp in plps {
                    check_logprob(out.id, lp, &token)?;
                }
            }
            if let Some(lps) = &out.logprobs {
                if lps.len() > out.new_tokens.len() {
                    return violation(format!(
                        "request {}: {} logprob entries for {} new tokens",
                        out.id,
                        lps.len(),
                        out.new_tokens.len()
                    ));
                }
                for lp in lps {
                    check_logprob(out.id, lp, &token)?;
                }
            }
        }
        // Now retire what finished. An error ends the whole request: the engine
        // reports all of a request's error finishes in one batch (a refusal is one
        // output for completion 0), so such requests go at the end of the batch.
        let mut errored = Vec::new();
        for out in &o.outputs {
            let Some(finish) = &out.finish else { continue };
            if matches!(finish, FinishReason::Error(_)) {
                errored.push(out.id);
            }
            if let Some(live) = self.live.get_mut(&out.id) {
                live.open = live.open.saturating_sub(1);
                if live.open == 0 {
                    self.live.remove(&out.id);
                }
            }
        }
        for id in errored {
            self.live.remove(&id);
        }
        Ok(())
    }

    /// Requests this link is tracking (for tests).
    pub fn num_live(&self) -> usize {
        self.live.len()
    }
}

/// One position's logprobs: token ids inside the vocabulary, a bounded list.
fn check_logprob(
    id: RequestId,
    lp: &TokenLogprob,
    token: &dyn Fn(u32, &str) -> Result<(), LinkViolation>,
) -> Result<(), LinkViolation> {
    token(lp.token, "logprob")?;
    // A peer sends at most the alternatives a request may ask for.
    if lp.top.len() > MAX_LOGPROBS as usize {
        return violation(format!("request {id}: {} top logprobs, more than {MAX_LOGPROBS}", lp.top.len()));
    }
    for &(t, _) in &lp.top {
        token(t, "top logprob")?;
    }
    Ok(())
}

/// The engine's checks of its link: the gateway answers Hello once, then commands.
#[derive(Debug, Default)]
pub struct EngineChecks {
    welcomed: bool,
    accepted: bool,
}

impl EngineChecks {
    /// The checks of a new link: no Welcome yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The largest frame the engine reads now: a handshake's until the API
    /// node accepted it.
    pub fn max_frame(&self) -> usize {
        if self.accepted {
            MAX_FRAME_BYTES
        } else {
            MAX_HANDSHAKE_FRAME_BYTES
        }
    }

    /// Checks a message received from the gateway: exactly one Welcome, and
    /// commands only after it.
    pub fn on_recv(&mut self, msg: &ToEngine) -> Result<(), LinkViolation> {
        match msg {
            ToEngine::Welcome(_) if self.welcomed => violation("a second Welcome"),
            ToEngine::Welcome(w) => {
                self.welcomed = true;
                self.accepted = w.accepted;
                Ok(())
            }
            ToEngine::Command(_) if !self.welcomed => violation("a command before the Welcome"),
            ToEngine::Command(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(rank: u32, vocab_size: u32) -> FromEngine {
        FromEngine::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            rank,
            model: "m".into(),
            fingerprint: ModelFingerprint::default(),
            vocab_size,
            max_model_len: 128,
            num_kv_blocks: 8,
            block_size: 16,
            node: "n".into(),
        })
    }

    fn add(id: u64, n: u32) -> ToEngine {
        let sampling = SamplingParams { n, ..SamplingParams::default() };
        ToEngine::Command(EngineCommand::Add(Box::new(EngineRequest::new(id, vec![1], sampling))))
    }

    fn out(rank: u32, id: u64, index: u32, tokens: Vec<u32>, finish: Option<FinishReason>) -> FromEngine {
        FromEngine::Outputs(EngineOutputs {
            rank,
            outputs: vec![TokenOutput { id, index, new_tokens: tokens, logprobs: None, finish, num_cached_tokens: 0, prompt_logprobs: None, timing: None }],
            stats: EngineStats::default(),
            kv_events: Vec::new(),
        })
    }

    fn ready() -> GatewayChecks {
        let mut c = GatewayChecks::new();
        c.on_recv(&hello(3, 100)).unwrap();
        c.on_send(&add(7, 2));
        c
    }

    #[test]
    fn a_well_behaved_rank_passes_and_finished_requests_are_forgotten() {
        let mut c = ready();
        c.on_recv(&out(3, 7, 0, vec![1, 99], None)).unwrap();
        c.on_recv(&out(3, 7, 1, vec![5], Some(FinishReason::Stop))).unwrap();
        c.on_recv(&out(3, 7, 0, vec![], Some(FinishReason::Length))).unwrap();
        assert_eq!(c.num_live(), 0);
        assert!(c.on_recv(&out(3, 7, 0, vec![1], None)).is_err(), "finished request");
    }

    #[test]
    fn a_resumed_request_answers_under_the_index_it_resumes() {
        let mut c = ready();
        let mut req = EngineRequest::new(9, vec![1, 2], SamplingParams { n: 4, prompt_logprobs: Some(1), ..Default::default() });
        req.resume = Some(Resume { index: 2, output_tokens: vec![5, 6] });
        c.on_send(&ToEngine::Command(EngineCommand::Add(Box::new(req))));
        assert!(c.on_recv(&out(3, 9, 0, vec![1], None)).unwrap_err().0.contains("completions 2..3"));
        let mut c = ready();
        let mut req = EngineRequest::new(9, vec![1, 2], SamplingParams { n: 4, prompt_logprobs: Some(1), ..Default::default() });
        req.resume = Some(Resume { index: 2, output_tokens: vec![5, 6] });
        c.on_send(&ToEngine::Command(EngineCommand::Add(Box::new(req))));
        let FromEngine::Outputs(mut o) = out(3, 9, 2, vec![1], Some(FinishReason::Stop)) else { unreachable!() };
        o.outputs[0].prompt_logprobs = Some(vec![TokenLogprob { token: 2, logprob: -1.0, rank: 1, top: vec![] }]);
        assert!(c.on_recv(&FromEngine::Outputs(o.clone())).unwrap_err().0.contains("prompt logprob"), "a resumed request gets none");
        o.outputs[0].prompt_logprobs = None;
        c.on_recv(&FromEngine::Outputs(o)).unwrap();
        assert_eq!(c.num_live(), 1, "request 7 still open, request 9 done");
    }

    #[test]
    fn an_error_ends_the_whole_request() {
        let mut c = ready();
        c.on_recv(&out(3, 7, 0, vec![], Some(FinishReason::Error(EngineError::invalid("no"))))).unwrap();
        assert_eq!(c.num_live(), 0);
    }

    #[test]
    fn violations() {
        let bad: Vec<(FromEngine, &str)> = vec![
            (out(4, 7, 0, vec![1], None), "rank"),
            (out(3, 7, 0, vec![100], None), "vocabulary"),
            (out(3, 8, 0, vec![1], None), "never sent"),
            (out(3, 7, 2, vec![1], None), "completion 2"),
            (hello(3, 100), "second Hello"),
        ];
        for (msg, why) in bad {
            let err = ready().on_recv(&msg).unwrap_err();
            assert!(err.0.contains(why), "{err} should mention {why}");
        }
        let mut c = GatewayChecks::new();
        assert!(c.on_recv(&out(3, 7, 0, vec![], None)).unwrap_err().0.contains("before Hello"));
    }

    #[test]
    fn kv_events_are_bounded_per_batch() {
        let with = |n: usize| {
            let FromEngine::Outputs(mut o) = out(3, 7, 0, vec![1], None) else { unreachable!() };
            o.kv_events = vec![KvEvent::Stored(1); n];
            FromEngine::Outputs(o)
        };
        assert!(ready().on_recv(&with(MAX_KV_EVENTS)).is_ok());
        let err = ready().on_recv(&with(MAX_KV_EVENTS + 1)).unwrap_err();
        assert!(err.0.contains("KV events"), "{err}");
    }

    #[test]
    fn logprob_violations() {
        let lp = |token: u32, top: Vec<(u32, f32)>| TokenLogprob { token, logprob: -1.0, rank: 1, top };
        let with = |lps: Vec<TokenLogprob>| {
            let FromEngine::Outputs(mut o) = out(3, 7, 0, vec![1], None) else { unreachable!() };
            o.outputs[0].logprobs = Some(lps);
            FromEngine::Outputs(o)
        };
        assert!(ready().on_recv(&with(vec![lp(1, vec![(2, -2.0)])])).is_ok());
        assert!(ready().on_recv(&with(vec![lp(100, vec![])])).is_err());
        assert!(ready().on_recv(&with(vec![lp(1, vec![(100, -2.0)])])).is_err());
        assert!(ready().on_recv(&with(vec![lp(1, vec![]), lp(1, vec![])])).is_err(), "more entries than tokens");
        assert!(ready().on_recv(&with(vec![lp(1, vec![(1, -1.0); MAX_LOGPROBS as usize + 1])])).is_err());
    }

    #[test]
    fn frames_stay_small_until_the_handshake_accepts() {
        let welcome = |accepted| ToEngine::Welcome(Welcome { protocol_version: PROTOCOL_VERSION, accepted, reason: None, rank: 3, retry: false });
        let mut c = GatewayChecks::new();
        assert_eq!(c.max_frame(), MAX_HANDSHAKE_FRAME_BYTES);
        c.on_recv(&hello(3, 100)).unwrap();
        assert_eq!(c.max_frame(), MAX_HANDSHAKE_FRAME_BYTES, "a Hello alone is not accepted");
        c.on_send(&welcome(false));
        assert_eq!(c.max_frame(), MAX_HANDSHAKE_FRAME_BYTES, "a refusal");
        c.on_send(&welcome(true));
        assert_eq!(c.max_frame(), MAX_FRAME_BYTES);

        let mut e = EngineChecks::new();
        assert_eq!(e.max_frame(), MAX_HANDSHAKE_FRAME_BYTES);
        e.on_recv(&welcome(false)).unwrap();
        assert_eq!(e.max_frame(), MAX_HANDSHAKE_FRAME_BYTES);
        let mut e = EngineChecks::new();
        e.on_recv(&welcome(true)).unwrap();
        assert_eq!(e.max_frame(), MAX_FRAME_BYTES);
    }

    #[test]
    fn engine_side() {
        let w = ToEngine::Welcome(Welcome { protocol_version: PROTOCOL_VERSION, accepted: true, reason: None, rank: 0, retry: false });
        let mut c = EngineChecks::new();
        assert!(c.on_recv(&ToEngine::Command(EngineCommand::Shutdown)).is_err());
        let mut c = EngineChecks::new();
        c.on_recv(&w).unwrap();
        c.on_recv(&ToEngine::Command(EngineCommand::Shutdown)).unwrap();
        assert!(c.on_recv(&w).is_err());
    }
}
