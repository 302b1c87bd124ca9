//! Which tokens end generation, found as llama.cpp's llama-vocab.cpp finds
//! them: EOS, the end-of-turn/end-of-message tokens, the FIM pad/repo/sep
//! tokens, and any token spelled like a known end-of-generation marker.
//! (llama.cpp matches by text because converters rarely record these ids.)

/// Spellings llama.cpp treats as end of generation.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// End-of-turn spellings (llama.cpp's EOT auto-detection).
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// Ids the model's metadata names explicitly (None where it does not).
#[derive(Default, Clone, Debug)]
pub(super) struct KnownIds {
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
    /// generation_config.json's eos_token_id list.
    pub extra: Vec<u32>,
}

/// The sorted, deduplicated end-of-generation set. `vocab` yields
/// (id, text) for every token.
pub(super) fn eog_ids<'a>(vocab: impl Iterator<Item = (u32, &'a str)>, known: &KnownIds) -> Vec<u32> {
    let mut eot = known.eot;
    let mut fim_pad = known.fim_pad;
    let mut fim_rep = known.fim_rep;
    let mut fim_sep = known.fim_sep;
    let mut out: Vec<u32> = Vec::new();
    let (mut end_id, mut has_return, mut has_call) = (None, false, false);
    for (id, text) in vocab {
        // The first match wins for the single-valued slots.
        if eot.is_none() && EOT_TEXTS.contains(&text) {
            eot = Some(id);
        }
        if fim_pad.is_none() && FIM_PAD_TEXTS.contains(&text) {
            fim_pad = Some(id);
        }
        if fim_rep.is_none() && FIM_REP_TEXTS.contains(&text) {
            fim_rep = Some(id);
        }
        if fim_sep.is_none() && FIM_SEP_TEXTS.contains(&text) {
            fim_sep = Some(id);
        }
        if EOG_TEXTS.contains(&text) {
            out.push(id);
            match text {
                "<|end|>" => end_id = Some(id),
                "<|return|>" => has_return = true,
                "<|call|>" => has_call = true,
                _ => {}
            }
        }
    }
    out.extend([known.eos, eot, known.eom, fim_pad, fim_rep, fim_sep].into_iter().flatten());
    out.extend(known.extra.iter().copied());
    // gpt-oss (o200k_harmony) ends turns with <|return|>/<|call|>; there
    // <|end|> separates messages and must not stop generation.
    if has_return && has_call {
        if let Some(end) = end_id {
            if known.eos != Some(end) && !known.extra.contains(&end) {
                out.retain(|&x| x != end);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm_like_vocab() {
        // SmolLM2's first tokens; llama.cpp reports EOG = [0, 2, 4] for it.
        let vocab = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<repo_name>",
            "<reponame>",
            "<file_sep>",
            "hello",
        ];
        let known = KnownIds { eos: Some(2), ..Default::default() };
        let ids = eog_ids(vocab.iter().enumerate().map(|(i, t)| (i as u32, *t)), &known);
        assert_eq!(ids, vec![0, 2, 4]);
    }

    #[test]
    fn llama3_and_generation_config() {
        let vocab = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "x"];
        let known = KnownIds { eos: Some(1), extra: vec![4, 1], ..Default::default() };
        let ids = eog_ids(vocab.iter().enumerate().map(|(i, t)| (i as u32, *t)), &known);
        assert_eq!(ids, vec![1, 2, 3, 4]);
    }

    #[test]
    fn harmony_end_is_not_eog() {
        let vocab = ["<|end|>", "<|return|>", "<|call|>", "<|endoftext|>"];
        let known = KnownIds { eos: Some(1), ..Default::default() };
        let ids = eog_ids(vocab.iter().enumerate().map(|(i, t)| (i as u32, *t)), &known);
        assert_eq!(ids, vec![1, 2, 3]);
    }
}
