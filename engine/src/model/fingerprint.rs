//! A model's fingerprint for the cluster handshake: which model a rank loaded,
//! computed from what describes it (its config, its tensor table), never from the
//! weights' bytes. See `ferry_transport::ModelFingerprint`.

use crate::model::config::ModelConfig;
use crate::model::weights::ModelWeights;
use crate::quant::QMatrix;
use ferry_transport::ModelFingerprint;
use sha2::{Digest, Sha256};

/// The first 8 bytes of a SHA-256: a stable hash across builds and machines,
/// which `std`'s hasher does not promise.
fn hash64(bytes: &[u8]) -> u64 {
    let d = Sha256::digest(bytes);
    u64::from_le_bytes(d[..8].try_into().expect("a SHA-256 has 32 bytes"))
}

/// The hash of the architecture's shape alone (what an API node that loads no
/// weights can still check).
pub fn config_hash(cfg: &ModelConfig) -> u64 {
    // Debug prints every field, floats included, in declaration order.
    hash64(format!("{cfg:?}").as_bytes())
}

/// The hash of the tensor table: each matrix's element type and shape, in the
/// order the forward pass uses them, and the norms' lengths.
pub fn tensors_hash(w: &ModelWeights) -> u64 {
    let mut table = String::new();
    let mut mat = |name: &str, m: &QMatrix| table.push_str(&format!("{name}:{:?}:{}x{};", m.ty(), m.rows(), m.cols()));
    mat("embed", &w.embed);
    for (i, l) in w.layers.iter().enumerate() {
        for (name, m) in [("q", &l.wq), ("k", &l.wk), ("v", &l.wv), ("o", &l.wo), ("gate", &l.w_gate), ("up", &l.w_up), ("down", &l.w_down)] {
            mat(&format!("{i}.{name}"), m);
        }
    }
    mat("lm_head", &w.lm_head);
    for l in &w.layers {
        table.push_str(&format!("norms:{}:{}:{};", l.attn_norm.len(), l.ffn_norm.len(), l.bq.is_some()));
    }
    table.push_str(&format!("norm:{}", w.norm.len()));
    hash64(table.as_bytes())
}

/// The model's fingerprint for the handshake: [`config_hash`] and [`tensors_hash`].
pub fn fingerprint(cfg: &ModelConfig, w: &ModelWeights) -> ModelFingerprint {
    ModelFingerprint { config: config_hash(cfg), tensors: tensors_hash(w) }
}
