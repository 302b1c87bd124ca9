//! The n-gram proposer (vLLM's `ngram`, prompt lookup decoding): text that
//! repeats its input (an edit of a given passage, a filled-in template, code
//! that reuses names) continues the way an earlier occurrence of its last few
//! tokens did.

/// Proposes up to `k` tokens to follow `tokens` (the sequence's prompt and
/// output so far): for the longest `n` in `min..=max` whose last-`n`-token
/// suffix occurs earlier in `tokens`, the tokens after its latest earlier
/// occurrence. Empty when no such `n` exists (the common case on text that
/// does not repeat, so speculation costs nothing there).
///
/// The latest occurrence, as vLLM's proposer takes (nearby text is the best
/// guide to what comes next), except that one followed by all `k` tokens is
/// preferred to a later one that runs into the end: in a short loop (a run of
/// one token, a repeated line) the latest match proposes a token or two, an
/// earlier lap of the same loop all `k`. The search is a plain backward scan, O(len * n)
/// per `n`, at most a few tens of microseconds on a 2048-token sequence; it
/// runs once per decoding sequence and step, beside a forward pass that
/// takes milliseconds.
pub fn propose(tokens: &[u32], min: usize, max: usize, k: usize) -> Vec<u32> {
    let len = tokens.len();
    if k == 0 || min == 0 || len < min + 1 {
        return Vec::new();
    }
    for n in (min..=max.min(len - 1)).rev() {
        let suffix = &tokens[len - n..];
        // Start positions of earlier occurrences, latest first; the suffix's
        // own position (len - n) is excluded, and one must leave at least one
        // token after it to propose.
        let mut partial = None;
        for s in (0..len - n).rev() {
            if &tokens[s..s + n] != suffix {
                continue;
            }
            if s + n + k <= len {
                return tokens[s + n..s + n + k].to_vec();
            }
            partial.get_or_insert(s);
        }
        if let Some(s) = partial {
            return tokens[s + n..].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::propose;

    #[test]
    fn continues_the_latest_longest_match() {
        //          0  1  2  3  4  5  6  7  8  9
        let t = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3];
        // Suffix [1, 2, 3] last occurred at 4: propose what followed it.
        assert_eq!(propose(&t, 1, 3, 2), vec![7, 8]);
        assert_eq!(propose(&t, 1, 3, 10), vec![7, 8, 1, 2, 3]);
        // A longer suffix that occurs wins over a shorter one's later match.
        let t = [5, 1, 2, 6, 3, 2, 4, 1, 2];
        assert_eq!(propose(&t, 1, 2, 1), vec![6]);
        assert_eq!(propose(&t, 1, 1, 1), vec![4]);
    }

    #[test]
    fn nothing_without_a_match() {
        assert!(propose(&[1, 2, 3, 4], 1, 3, 4).is_empty());
        assert!(propose(&[1, 2, 3, 1, 2], 3, 3, 4).is_empty());
        assert!(propose(&[], 1, 3, 4).is_empty());
        assert!(propose(&[7, 7], 1, 3, 0).is_empty());
        // A run of one token proposes more of it.
        assert_eq!(propose(&[7, 7, 7], 1, 3, 4), vec![7]);
        assert_eq!(propose(&[7, 7, 7, 7, 7], 2, 2, 2), vec![7, 7]);
        assert_eq!(propose(&[7, 7, 7, 7, 7], 2, 2, 4), vec![7]);
    }
}
