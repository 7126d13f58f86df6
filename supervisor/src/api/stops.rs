//! Stop strings: generated text passes through a [`StopMatcher`], which holds back what might be
//! the start of a stop string and cuts the answer at the first match.
//!
//! Invariants: text is released in order and whole characters at a time; nothing at or after a
//! match is ever released; without stop strings every piece passes through at once. It sees
//! text only (content, or a completion's text), never token ids.

/// Holds back text that might be the start of a stop string, and cuts at the first match.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    longest: usize,
}

impl StopMatcher {
    /// A matcher for `stops` (none empty: the request parser refuses empty ones).
    pub fn new(stops: Vec<String>) -> Self {
        let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        Self {
            stops,
            pending: String::new(),
            longest,
        }
    }

    /// Adds generated text; returns what may be released now and whether a stop string matched
    /// (then nothing after it is ever released).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.pending.push_str(text);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the last longest−1 bytes (on a char boundary): they may begin a stop string.
        let mut keep_from = self
            .pending
            .len()
            .saturating_sub(self.longest.saturating_sub(1));
        while !self.pending.is_char_boundary(keep_from) {
            keep_from -= 1;
        }
        let out = self.pending[..keep_from].to_string();
        self.pending.drain(..keep_from);
        (out, false)
    }

    /// The held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_strings_cut_across_pushes() {
        let mut m = StopMatcher::new(vec!["END".into(), "\n\n".into()]);
        let (a, hit) = m.push("hello E");
        assert!(!hit);
        let (b, hit) = m.push("ND world");
        assert!(hit);
        assert_eq!(format!("{a}{b}"), "hello ");
    }

    #[test]
    fn text_without_stops_passes_through_whole() {
        let mut m = StopMatcher::new(vec!["zz".into()]);
        let (a, _) = m.push("abcz");
        let (b, _) = m.push("é!");
        let c = m.finish();
        assert_eq!(format!("{a}{b}{c}"), "abczé!");
        let mut none = StopMatcher::new(vec![]);
        assert_eq!(none.push("x").0, "x");
    }
}
