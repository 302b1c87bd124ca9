//! Stop strings, found in the detokenized text as it grows.
//!
//! Text arrives in pieces that need not line up with a stop string ("EN" then "D").
//! The checker releases text only once it can no longer be the start of a stop
//! string: the longest tail of the unreleased text that is a prefix of some stop
//! string is held back until the next piece settles it. Any later match must begin
//! inside that held tail, so nothing released is ever taken back.

use std::sync::Arc;

/// What one piece of text led to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StopCheck {
    /// Text safe to send now (maybe empty: all of it is held back).
    Continue(String),
    /// A stop string matched: `text` is the last text to send (up to the match, or
    /// through it with `include_stop_str_in_output`), `matched` the stop string.
    Stopped { text: String, matched: String },
}

/// A request's stop strings, built once and shared by all its choices: an
/// Aho–Corasick automaton finds the earliest match in one pass over the text,
/// whatever the number of strings, and a sorted copy answers "could this tail
/// still grow into one?" by binary search.
#[derive(Debug)]
pub(crate) struct StopSet {
    stops: Vec<String>,
    /// Leftmost-first: the earliest match wins, and at one position the stop
    /// string listed first (OpenAI's and vLLM's order).
    automaton: Option<aho_corasick::AhoCorasick>,
    sorted: Vec<String>,
    longest: usize,
}

impl StopSet {
    /// Empty stop strings are dropped: they would match before any text. The
    /// gateway bounds their number and total length before this (`limits`).
    pub(crate) fn new(stops: Vec<String>) -> Arc<StopSet> {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let automaton = (!stops.is_empty())
            .then(|| {
                aho_corasick::AhoCorasick::builder()
                    .match_kind(aho_corasick::MatchKind::LeftmostFirst)
                    .build(&stops)
                    .ok()
            })
            .flatten();
        let mut sorted = stops.clone();
        sorted.sort();
        sorted.dedup();
        let longest = stops.iter().map(std::string::String::len).max().unwrap_or(0);
        Arc::new(StopSet { stops, automaton, sorted, longest })
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.automaton.is_none()
    }

    /// Some stop string starts with `tail` and is longer than it.
    fn could_grow_from(&self, tail: &str) -> bool {
        let at = self.sorted.partition_point(|s| s.as_str() < tail);
        // Strings that start with `tail` sort at and right after it; skip an
        // exact equal (it would have matched already).
        self.sorted[at..].iter().take(2).any(|s| s.len() > tail.len() && s.starts_with(tail))
    }
}

#[derive(Clone, Debug)]
pub(crate) struct StopChecker {
    set: Arc<StopSet>,
    include_stop_str: bool,
    held: String,
}

impl StopChecker {
    pub(crate) fn new(set: Arc<StopSet>, include_stop_str_in_output: bool) -> Self {
        StopChecker { set, include_stop_str: include_stop_str_in_output, held: String::new() }
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Feed the next piece of text. With `check` false (fewer than `min_tokens`
    /// generated) matches are not looked for, but possible prefixes are still held.
    pub(crate) fn push(&mut self, piece: &str, check: bool) -> StopCheck {
        self.held.push_str(piece);
        let Some(ac) = &self.set.automaton else {
            return StopCheck::Continue(std::mem::take(&mut self.held));
        };
        if check {
            if let Some(m) = ac.find(self.held.as_str()) {
                let matched = self.set.stops[m.pattern().as_usize()].clone();
                let end = if self.include_stop_str { m.end() } else { m.start() };
                let text = self.held[..end].to_string();
                self.held.clear();
                return StopCheck::Stopped { text, matched };
            }
        }
        let keep = self.held_back_len();
        let release = self.held.len() - keep;
        let out = self.held[..release].to_string();
        self.held.drain(..release);
        StopCheck::Continue(out)
    }

    /// The sequence ended without a match: whatever was held back is plain text.
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Bytes at the end of `held` that could still grow into a stop string: the
    /// longest suffix (on a char boundary) that is a proper prefix of one. Only
    /// suffixes shorter than the longest stop string can be.
    fn held_back_len(&self) -> usize {
        let h = self.held.as_str();
        let from = h.len().saturating_sub(self.set.longest.saturating_sub(1));
        for (start, _) in h.char_indices().filter(|(i, _)| *i >= from) {
            if self.set.could_grow_from(&h[start..]) {
                return h.len() - start;
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed pieces; return (all text released, the match if any). The reference is
    /// the whole text cut at the first occurrence found by a plain search.
    fn run(stops: &[&str], include: bool, pieces: &[&str]) -> (String, Option<String>) {
        let mut c = StopChecker::new(StopSet::new(stops.iter().map(std::string::ToString::to_string).collect()), include);
        let mut out = String::new();
        for p in pieces {
            match c.push(p, true) {
                StopCheck::Continue(t) => out.push_str(&t),
                StopCheck::Stopped { text, matched } => {
                    out.push_str(&text);
                    return (out, Some(matched));
                }
            }
        }
        out.push_str(&c.finish());
        (out, None)
    }

    fn reference(stops: &[&str], include: bool, whole: &str) -> (String, Option<String>) {
        let best = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| whole.find(s).map(|p| (p, *s)))
            .min_by_key(|(p, _)| *p);
        match best {
            Some((p, s)) => {
                let end = if include { p + s.len() } else { p };
                (whole[..end].to_string(), Some(s.to_string()))
            }
            None => (whole.to_string(), None),
        }
    }

    #[test]
    fn match_across_piece_boundaries() {
        assert_eq!(run(&["END"], false, &["Hello E", "N", "D tail"]), ("Hello ".into(), Some("END".into())));
        assert_eq!(run(&["END"], true, &["Hello E", "N", "D tail"]), ("Hello END".into(), Some("END".into())));
        assert_eq!(run(&["\n\n"], false, &["a\n", "\nb"]), ("a".into(), Some("\n\n".into())));
    }

    #[test]
    fn held_back_prefix_is_released_when_it_cannot_match() {
        let mut c = StopChecker::new(StopSet::new(vec!["END".into()]), false);
        assert_eq!(c.push("abc E", true), StopCheck::Continue("abc ".into()));
        assert_eq!(c.push("N", true), StopCheck::Continue(String::new()));
        assert_eq!(c.push("X", true), StopCheck::Continue("ENX".into()));
        assert_eq!(c.push("EN", true), StopCheck::Continue(String::new()));
        assert_eq!(c.finish(), "EN");
    }

    #[test]
    fn overlapping_candidates_and_multibyte_text() {
        // "ab" held, "abab" might still match "ababc".
        assert_eq!(run(&["ababc"], false, &["xab", "ab", "abc!"]), ("xab".into(), Some("ababc".into())));
        assert_eq!(run(&["é!"], false, &["caf", "é", "!"]), ("caf".into(), Some("é!".into())));
        // Both complete with the same piece: the earlier start wins.
        assert_eq!(run(&["stop", "op"], false, &["st", "op"]), ("".into(), Some("stop".into())));
    }

    #[test]
    fn no_stops_passes_text_through_and_min_tokens_defers_checks() {
        let mut c = StopChecker::new(StopSet::new(vec![String::new()]), false);
        assert!(c.is_empty());
        assert_eq!(c.push("anything", true), StopCheck::Continue("anything".into()));
        let mut c = StopChecker::new(StopSet::new(vec!["x".into()]), false);
        assert_eq!(c.push("axb", false), StopCheck::Continue("axb".into()));
        assert_eq!(c.push("cx", true), StopCheck::Stopped { text: "c".into(), matched: "x".into() });
    }

    /// Every way of splitting some texts into pieces gives the reference's answer.
    #[test]
    fn all_splits_agree_with_whole_text_search() {
        let cases: &[(&[&str], &str)] = &[
            (&["END"], "the END is near END"),
            (&["\n", "User:"], "Sure thing User: no"),
            (&["aaa"], "aaaaaaa"),
            (&["xyz"], "no match here xy"),
            (&["ün", "n!"], "grün!"),
        ];
        for &(stops, whole) in cases {
            let cuts: Vec<usize> = whole.char_indices().map(|(i, _)| i).skip(1).collect();
            // All subsets of cut points (texts are short).
            for mask in 0u32..(1 << cuts.len().min(16)) {
                let mut pieces = Vec::new();
                let mut last = 0;
                for (k, &c) in cuts.iter().enumerate() {
                    if mask & (1 << k) != 0 {
                        pieces.push(&whole[last..c]);
                        last = c;
                    }
                }
                pieces.push(&whole[last..]);
                for include in [false, true] {
                    assert_eq!(run(stops, include, &pieces), reference(stops, include, whole), "{pieces:?}");
                }
            }
        }
    }
}
