//! The prompts of a run: synthetic ("random") or read from a JSONL file.
//!
//! vLLM's random dataset draws token ids and decodes them with the server's
//! tokenizer, so each prompt has an exact token count. This client has no
//! tokenizer for an arbitrary server, so it draws whole words from a fixed
//! vocabulary of short, common English words that BPE vocabularies (Llama,
//! SmolLM, GPT-2, Qwen) keep as one token each when preceded by a space: a
//! prompt of N words is about N tokens. The report always uses the prompt
//! token counts the server returns in `usage`; the word count is only the
//! fallback when a server sends no usage.

use std::io::BufRead;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::rng::Rng;

/// One request to send.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SampleRequest {
    pub prompt: String,
    /// Prompt length as this client estimates it (words for random prompts,
    /// whitespace-separated words for JSONL); the server's count replaces it.
    pub prompt_len_estimate: usize,
    /// max_tokens for the request.
    pub output_len: usize,
}

/// Parameters of the random dataset, as vLLM's --random-* flags.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RandomSpec {
    pub num_requests: usize,
    pub input_len: usize,
    pub output_len: usize,
    pub range_ratio: f64,
    pub prefix_len: usize,
    pub seed: u64,
}

/// Short words that are single tokens (with a leading space) in common BPE vocabularies;
/// checked against SmolLM2's tokenizer: a 200-word prompt is 200 tokens.
const VOCAB: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "by", "at", "from",
    "his", "her", "they", "this", "that", "which", "or", "an", "be", "are", "not", "but", "had",
    "have", "has", "one", "two", "three", "four", "five", "six", "new", "first", "last", "time",
    "year", "day", "people", "world", "city", "state", "house", "school", "water", "light", "home",
    "work", "life", "part", "place", "case", "week", "game", "team", "group", "number", "point",
    "system", "program", "question", "government", "company", "family", "country", "night",
    "story", "money", "book", "line", "name", "side", "music", "power", "market", "road", "river",
    "field", "room", "table", "window", "door", "tree", "garden", "street", "car", "train",
    "ship", "air", "fire", "land", "sea", "sun", "moon", "star", "food", "bread", "milk", "tea",
    "coffee", "apple", "stone", "gold", "paper", "glass", "wood", "song", "word", "letter",
    "picture", "color", "red", "blue", "green", "black", "white", "small", "large", "long",
    "short", "high", "low", "old", "young", "good", "great", "little", "big", "right", "left",
    "early", "late", "open", "close", "free", "full", "hard", "easy", "strong", "clear", "warm",
    "cold", "fast", "slow", "simple", "public", "local", "real", "best", "true", "make", "take",
    "give", "find", "tell", "ask", "call", "try", "need", "feel", "leave", "put", "keep",
    "let", "begin", "help", "show", "hear", "play", "run", "move", "live", "hold", "bring",
    "write", "read", "learn", "change", "lead", "watch", "follow", "stop", "speak", "build",
    "stay", "fall", "reach", "walk", "win", "send", "turn", "start", "end", "plan", "test",
    "model", "data", "price", "order", "form", "area", "level", "rate", "force",
    "class", "month", "hour", "minute", "north", "south", "east", "west", "king",
    "party", "army", "court", "church", "bank", "office", "center", "police", "doctor", "friend",
];

/// Draws `n` words from the vocabulary, joined by single spaces.
fn random_words(rng: &mut Rng, n: usize, out: &mut String) {
    for i in 0..n {
        if i > 0 || !out.is_empty() {
            out.push(' ');
        }
        let w = VOCAB[rng.range_inclusive(0, VOCAB.len() as u64 - 1) as usize];
        out.push_str(w);
    }
}

/// Integer bounds vLLM uses for a length with a range ratio: floor(len*(1-r)) ..= ceil(len*(1+r)).
pub(crate) fn length_bounds(len: usize, ratio: f64) -> (usize, usize) {
    let lo = (len as f64 * (1.0 - ratio)).floor() as usize;
    let hi = (len as f64 * (1.0 + ratio)).ceil() as usize;
    (lo, hi.max(lo))
}

/// Synthetic prompts: a shared prefix of `prefix_len` words, then a per-request
/// body whose length is drawn uniformly from the range-ratio bounds; output
/// lengths are drawn the same way (at least 1), as in vLLM's RandomDataset.
pub(crate) fn random_dataset(spec: &RandomSpec) -> Result<Vec<SampleRequest>> {
    if !(0.0..1.0).contains(&spec.range_ratio) {
        bail!("random range ratio must be in [0, 1), got {}", spec.range_ratio);
    }
    let (in_lo, in_hi) = length_bounds(spec.input_len, spec.range_ratio);
    let (out_lo, out_hi) = length_bounds(spec.output_len, spec.range_ratio);
    let (out_lo, out_hi) = (out_lo.max(1), out_hi.max(1));
    if spec.prefix_len + in_lo == 0 {
        bail!("random prompts would be empty: raise --random-input-len or --random-prefix-len");
    }
    let mut rng = Rng::new(spec.seed);
    let mut prefix = String::new();
    random_words(&mut rng, spec.prefix_len, &mut prefix);
    // Lengths first, then text, so the lengths for a seed do not depend on the vocabulary.
    let lens: Vec<(usize, usize)> = (0..spec.num_requests)
        .map(|_| {
            let i = rng.range_inclusive(in_lo as u64, in_hi as u64) as usize;
            let o = rng.range_inclusive(out_lo as u64, out_hi as u64) as usize;
            (i, o)
        })
        .collect();
    Ok(lens
        .into_iter()
        .map(|(input_len, output_len)| {
            let mut prompt = prefix.clone();
            random_words(&mut rng, input_len, &mut prompt);
            SampleRequest {
                prompt,
                prompt_len_estimate: spec.prefix_len + input_len,
                output_len,
            }
        })
        .collect())
}

/// Reads a JSONL file: each non-blank line an object with a string "prompt" and
/// an optional positive integer "output_len" (else `default_output_len`). When
/// the file has fewer rows than `num_requests`, rows are reused in order.
pub(crate) fn jsonl_dataset(
    path: &Path,
    num_requests: usize,
    default_output_len: usize,
) -> Result<Vec<SampleRequest>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open dataset {}", path.display()))?;
    let rows = parse_jsonl(std::io::BufReader::new(file), default_output_len)
        .with_context(|| format!("in dataset {}", path.display()))?;
    if rows.is_empty() {
        bail!("dataset {} has no prompts", path.display());
    }
    Ok((0..num_requests).map(|i| rows[i % rows.len()].clone()).collect())
}

fn parse_jsonl(reader: impl BufRead, default_output_len: usize) -> Result<Vec<SampleRequest>> {
    let mut rows = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let lineno = i + 1;
        let line = line.with_context(|| format!("line {lineno}: cannot read"))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("line {lineno}: not valid JSON"))?;
        let Some(obj) = v.as_object() else {
            bail!("line {lineno}: expected a JSON object");
        };
        let Some(prompt) = obj.get("prompt").and_then(|p| p.as_str()) else {
            bail!("line {lineno}: missing string field \"prompt\"");
        };
        let output_len = match obj.get("output_len") {
            None | Some(serde_json::Value::Null) => default_output_len,
            Some(x) => match x.as_u64() {
                Some(n) if n >= 1 => n as usize,
                _ => bail!("line {lineno}: \"output_len\" must be a positive integer, got {x}"),
            },
        };
        rows.push(SampleRequest {
            prompt: prompt.to_string(),
            prompt_len_estimate: prompt.split_whitespace().count(),
            output_len,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: usize, input: usize, output: usize, ratio: f64, prefix: usize, seed: u64) -> RandomSpec {
        RandomSpec { num_requests: n, input_len: input, output_len: output, range_ratio: ratio, prefix_len: prefix, seed }
    }

    #[test]
    fn fixed_lengths_give_exact_word_counts() {
        let reqs = random_dataset(&spec(20, 64, 16, 0.0, 0, 1)).unwrap();
        assert_eq!(reqs.len(), 20);
        for r in &reqs {
            assert_eq!(r.prompt.split(' ').count(), 64);
            assert_eq!(r.prompt_len_estimate, 64);
            assert_eq!(r.output_len, 16);
            assert!(r.prompt.split(' ').all(|w| VOCAB.contains(&w)));
        }
        // Different requests get different prompts.
        assert_ne!(reqs[0].prompt, reqs[1].prompt);
    }

    #[test]
    fn ranged_lengths_stay_in_vllm_bounds_and_vary() {
        // floor(100 * 0.75) = 75, ceil(100 * 1.25) = 125; output floor(10*.75)=7 .. ceil(12.5)=13.
        assert_eq!(length_bounds(100, 0.25), (75, 125));
        assert_eq!(length_bounds(10, 0.25), (7, 13));
        let reqs = random_dataset(&spec(500, 100, 10, 0.25, 0, 3)).unwrap();
        let ins: Vec<usize> = reqs.iter().map(|r| r.prompt.split(' ').count()).collect();
        let outs: Vec<usize> = reqs.iter().map(|r| r.output_len).collect();
        assert!(ins.iter().all(|&l| (75..=125).contains(&l)));
        assert!(outs.iter().all(|&l| (7..=13).contains(&l)));
        assert_eq!(*ins.iter().min().unwrap(), 75);
        assert_eq!(*ins.iter().max().unwrap(), 125);
        let mean = ins.iter().sum::<usize>() as f64 / ins.len() as f64;
        assert!((mean - 100.0).abs() < 2.5, "{mean}");
    }

    #[test]
    fn seed_reproduces_and_changes_prompts() {
        let a = random_dataset(&spec(10, 32, 8, 0.5, 4, 11)).unwrap();
        let b = random_dataset(&spec(10, 32, 8, 0.5, 4, 11)).unwrap();
        let c = random_dataset(&spec(10, 32, 8, 0.5, 4, 12)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn shared_prefix_is_common_to_every_prompt() {
        let reqs = random_dataset(&spec(8, 10, 4, 0.0, 6, 5)).unwrap();
        let prefix: Vec<&str> = reqs[0].prompt.split(' ').take(6).collect();
        for r in &reqs {
            let words: Vec<&str> = r.prompt.split(' ').collect();
            assert_eq!(words.len(), 16);
            assert_eq!(&words[..6], &prefix[..]);
            assert_eq!(r.prompt_len_estimate, 16);
        }
        // The bodies after the prefix differ.
        assert_ne!(reqs[0].prompt, reqs[1].prompt);
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(random_dataset(&spec(1, 0, 1, 0.0, 0, 0)).is_err());
        assert!(random_dataset(&spec(1, 10, 1, 1.0, 0, 0)).is_err());
    }

    #[test]
    fn jsonl_rows_defaults_and_errors() {
        let text = "{\"prompt\": \"hello there world\", \"output_len\": 5}\n\n{\"prompt\": \"x\"}\n";
        let rows = parse_jsonl(std::io::Cursor::new(text), 77).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].output_len, 5);
        assert_eq!(rows[0].prompt_len_estimate, 3);
        assert_eq!(rows[1].output_len, 77);

        let err = parse_jsonl(std::io::Cursor::new("{\"prompt\": 1}\n"), 1).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        let err = parse_jsonl(std::io::Cursor::new("{\"prompt\":\"a\"}\nnot json\n"), 1).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        let err =
            parse_jsonl(std::io::Cursor::new("{\"prompt\":\"a\",\"output_len\":0}"), 1).unwrap_err();
        assert!(err.to_string().contains("positive"), "{err}");
    }

    #[test]
    fn jsonl_file_cycles_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"prompt\":\"a\"}\n{\"prompt\":\"b\"}\n").unwrap();
        let reqs = jsonl_dataset(&p, 5, 3).unwrap();
        let prompts: Vec<&str> = reqs.iter().map(|r| r.prompt.as_str()).collect();
        assert_eq!(prompts, ["a", "b", "a", "b", "a"]);
        assert!(jsonl_dataset(&dir.path().join("missing"), 1, 1).is_err());
    }
}
