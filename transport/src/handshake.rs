//! The handshake, one implementation for every link. Sans-IO.
//!
//! The engine says [`Hello`]; the gateway checks it with [`check_hello`] and
//! answers with [`welcome`]; the engine checks the answer with [`check_welcome`].
//! A refusal names what differs, and both sides log the same sentence.

use crate::*;

/// What the gateway requires of a rank that says hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expectations {
    /// The gateway's [`PROTOCOL_VERSION`]; a Hello must carry the same.
    pub protocol_version: u32,
    /// `--data-parallel-size`: a Hello's rank must be below it, unless the
    /// cluster is elastic.
    pub data_parallel_size: u32,
    /// `--data-parallel-elastic`: ranks may join beyond `data_parallel_size`
    /// (below [`MAX_RANKS`]), and leave.
    pub elastic: bool,
    /// [`ModelFingerprint::config`] of the model the gateway serves: computed
    /// from the model's config, so even an API node that loads no weights has it.
    pub config_fingerprint: u64,
    /// None: the gateway loaded no weights, so it cannot know the tensor table;
    /// the first rank it accepts sets it for all later ones ([`Self::accepted`]).
    pub tensors_fingerprint: Option<u64>,
    /// Tokens per KV block. None until the first rank is accepted, which then
    /// sets it for all: every rank must hash prompt blocks alike, so that a
    /// cached prefix means the same on each (prefix-aware routing, migration).
    pub block_size: Option<u32>,
}

impl Expectations {
    /// The expectations after `hello` was accepted: a tensor table not known yet
    /// becomes this rank's, so every later rank must have loaded the same weights.
    pub fn accepted(&self, hello: &Hello) -> Expectations {
        Expectations {
            tensors_fingerprint: Some(self.tensors_fingerprint.unwrap_or(hello.fingerprint.tensors)),
            block_size: Some(self.block_size.unwrap_or(hello.block_size)),
            ..self.clone()
        }
    }
}

/// Why a handshake failed, in words for both sides' logs.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{message}")]
pub struct Refusal {
    /// What differs, in one sentence for the logs (the gateway also sends its
    /// refusals as the Welcome's `reason`).
    pub message: String,
    /// Waiting may change the answer: the engine should dial again.
    pub retry: bool,
}

impl Refusal {
    /// A refusal that waiting may lift.
    pub fn passing(message: String) -> Refusal {
        Refusal { message, retry: true }
    }
}

fn refuse(message: String) -> Result<(), Refusal> {
    Err(Refusal { message, retry: false })
}

/// The gateway's check of a rank's Hello. `joined(rank)` says whether that rank
/// already has a live link (a rank that left and came back is not a duplicate).
pub fn check_hello(hello: &Hello, exp: &Expectations, joined: &impl Fn(u32) -> bool) -> Result<(), Refusal> {
    if hello.protocol_version != exp.protocol_version {
        return refuse(format!(
            "protocol version differs: the engine speaks {}, the gateway {}",
            hello.protocol_version, exp.protocol_version
        ));
    }
    if hello.rank == AUTO_RANK {
        // The API node assigns a rank before it checks the Hello.
        return refuse("this API node assigns no rank numbers: start it with --data-parallel-elastic, or give the node --data-parallel-start-rank N".into());
    }
    if exp.elastic && hello.rank >= MAX_RANKS {
        return refuse(format!("rank {} is out of range: ranks are numbered below {MAX_RANKS}", hello.rank));
    }
    if !exp.elastic && hello.rank >= exp.data_parallel_size {
        return refuse(format!(
            "rank {} is out of range: --data-parallel-size is {} (the API node is not --data-parallel-elastic)",
            hello.rank, exp.data_parallel_size
        ));
    }
    if hello.node.len() > MAX_NODE_ID_BYTES {
        return refuse(format!("the node identity is {} bytes, more than {MAX_NODE_ID_BYTES}", hello.node.len()));
    }
    if joined(hello.rank) {
        // Another node's live link holds it: that link may be the stale one
        // of a node that died (its timeout frees the rank), so dial again.
        return Err(Refusal::passing(format!("rank {} is already connected", hello.rank)));
    }
    if hello.fingerprint.config != exp.config_fingerprint {
        return refuse(format!(
            "model fingerprint differs: rank {} loaded {:?} with config {:016x}, the gateway expects config {:016x}",
            hello.rank, hello.model, hello.fingerprint.config, exp.config_fingerprint
        ));
    }
    if let Some(tensors) = exp.tensors_fingerprint {
        if hello.fingerprint.tensors != tensors {
            return refuse(format!(
                "model fingerprint differs: rank {} loaded {:?} with tensor table {:016x}, the cluster has {:016x} \
                 (another quantization or file of the model?)",
                hello.rank, hello.model, hello.fingerprint.tensors, tensors
            ));
        }
    }
    if let Some(block_size) = exp.block_size {
        if hello.block_size != block_size {
            return refuse(format!(
                "block size differs: rank {} caches {} tokens per block, the cluster {block_size} (give every node the same --block-size)",
                hello.rank, hello.block_size
            ));
        }
    }
    Ok(())
}

/// The gateway's answer to `hello`, which it checked with `result`.
pub fn welcome(hello: &Hello, result: &Result<(), Refusal>) -> Welcome {
    Welcome {
        protocol_version: PROTOCOL_VERSION,
        accepted: result.is_ok(),
        reason: result.as_ref().err().map(|r| r.message.clone()),
        rank: hello.rank,
        retry: result.as_ref().err().is_some_and(|r| r.retry),
    }
}

/// The engine's check of the gateway's answer to its Hello as rank `rank`
/// ([`AUTO_RANK`]: any rank number the gateway assigns).
pub fn check_welcome(w: &Welcome, rank: u32) -> Result<(), Refusal> {
    if w.protocol_version != PROTOCOL_VERSION {
        return refuse(format!(
            "protocol version differs: the gateway speaks {}, this engine {PROTOCOL_VERSION}",
            w.protocol_version
        ));
    }
    if !w.accepted {
        let why = w.reason.as_deref().unwrap_or("no reason given");
        return Err(Refusal { message: format!("the gateway refused this rank: {why}"), retry: w.retry });
    }
    if rank == AUTO_RANK && w.rank >= MAX_RANKS {
        return refuse(format!("the gateway assigned rank {}, out of range", w.rank));
    }
    if rank != AUTO_RANK && w.rank != rank {
        return refuse(format!("the gateway welcomed rank {} on the link of rank {rank}", w.rank));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(rank: u32, config: u64, tensors: u64) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            rank,
            model: "m".into(),
            fingerprint: ModelFingerprint { config, tensors },
            vocab_size: 10,
            max_model_len: 64,
            num_kv_blocks: 4,
            block_size: 16,
            node: "node-a".into(),
        }
    }

    fn exp(tensors: Option<u64>) -> Expectations {
        Expectations {
            protocol_version: PROTOCOL_VERSION,
            data_parallel_size: 4,
            elastic: false,
            config_fingerprint: 0xc0,
            tensors_fingerprint: tensors,
            block_size: None,
        }
    }

    const NONE: fn(u32) -> bool = |_| false;

    fn refused(h: &Hello, e: &Expectations, joined: &impl Fn(u32) -> bool) -> String {
        check_hello(h, e, joined).unwrap_err().message
    }

    #[test]
    fn accepts_a_matching_rank() {
        assert_eq!(check_hello(&hello(3, 0xc0, 0x7e), &exp(Some(0x7e)), &NONE), Ok(()));
    }

    #[test]
    fn refusals_say_what_differs() {
        let mut h = hello(0, 0xc0, 0x7e);
        h.protocol_version = PROTOCOL_VERSION + 1;
        assert!(refused(&h, &exp(None), &NONE).contains("protocol version differs"));
        assert_eq!(
            refused(&hello(5, 0xc0, 0), &exp(None), &NONE),
            "rank 5 is out of range: --data-parallel-size is 4 (the API node is not --data-parallel-elastic)"
        );
        let elastic = Expectations { elastic: true, ..exp(None) };
        assert_eq!(check_hello(&hello(5, 0xc0, 0), &elastic, &NONE), Ok(()), "an elastic cluster grows past its size");
        assert!(refused(&hello(MAX_RANKS, 0xc0, 0), &elastic, &NONE).contains("out of range"));
        assert!(refused(&hello(AUTO_RANK, 0xc0, 0), &exp(None), &NONE).contains("--data-parallel-elastic"));
        assert_eq!(refused(&hello(1, 0xc0, 0), &exp(None), &|r| r == 1), "rank 1 is already connected");
        assert!(refused(&hello(1, 0xc1, 0), &exp(None), &NONE).starts_with("model fingerprint differs"));
        assert!(refused(&hello(1, 0xc0, 1), &exp(Some(2)), &NONE).contains("tensor table"));
        let mut h = hello(1, 0xc0, 2);
        h.block_size = 32;
        let e = exp(Some(2)).accepted(&hello(0, 0xc0, 2));
        assert_eq!(e.block_size, Some(16));
        assert!(refused(&h, &e, &NONE).starts_with("block size differs: rank 1 caches 32"));
    }

    #[test]
    fn the_first_rank_sets_an_unknown_tensor_table() {
        let e = exp(None);
        let first = hello(0, 0xc0, 0xaa);
        check_hello(&first, &e, &NONE).unwrap();
        let e = e.accepted(&first);
        assert_eq!(e.tensors_fingerprint, Some(0xaa));
        assert!(check_hello(&hello(1, 0xc0, 0xbb), &e, &NONE).is_err());
        assert!(check_hello(&hello(1, 0xc0, 0xaa), &e, &NONE).is_ok());
        assert_eq!(e.accepted(&hello(1, 0xc0, 0xbb)).tensors_fingerprint, Some(0xaa), "a known table stays");
    }

    #[test]
    fn welcome_carries_the_reason_and_the_engine_reads_it() {
        let h = hello(1, 0xc0, 0);
        assert_eq!(check_welcome(&welcome(&h, &Ok(())), 1), Ok(()));
        let r = check_hello(&h, &exp(None), &|r| r == 1);
        let got = check_welcome(&welcome(&h, &r), 1).unwrap_err();
        assert_eq!(got.message, "the gateway refused this rank: rank 1 is already connected");
        assert!(got.retry, "a duplicate may be stale: dial again");
        let r = check_hello(&hello(1, 0xc1, 0), &exp(None), &NONE);
        assert!(!check_welcome(&welcome(&h, &r), 1).unwrap_err().retry, "another model: stop");
        let mut long = hello(1, 0xc0, 0);
        long.node = "x".repeat(MAX_NODE_ID_BYTES + 1);
        assert!(refused(&long, &exp(None), &NONE).contains("node identity"));
        let w = Welcome { protocol_version: 1, accepted: true, reason: None, rank: 1, retry: false };
        assert!(check_welcome(&w, 1).unwrap_err().message.contains("protocol version differs"));
        assert!(check_welcome(&welcome(&h, &Ok(())), 2).unwrap_err().message.contains("welcomed rank 1 on the link of rank 2"));
        assert_eq!(check_welcome(&welcome(&h, &Ok(())), AUTO_RANK), Ok(()), "an assigned rank is taken");
    }
}
