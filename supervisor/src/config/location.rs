//! Where a TOML parse error is, in words: 1-based line and column, and the key path around
//! it (`server.port`, `models[1].stages`) worked out from the text, since the parser reports a
//! position but not which table it was in. Best effort: it reads headers and `key =` lines,
//! not inline tables or keys split over lines.

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The key path around a byte offset, worked out from the text: the enclosing table header
/// (`[server]`, the n-th `[[models]]` as `models[n]`) and the key on that line.
pub(super) fn key_path_near(text: &str, offset: usize) -> Option<String> {
    let mut table: Option<String> = None;
    let mut array_counts: Vec<(String, usize)> = Vec::new();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let end = start + line.len();
        let trimmed = line.trim();
        if let Some((name, is_array)) = header(trimmed) {
            table = Some(if is_array {
                let index = match array_counts.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, count)) => {
                        *count += 1;
                        *count - 1
                    }
                    None => {
                        array_counts.push((name.clone(), 1));
                        0
                    }
                };
                format!("{name}[{index}]")
            } else {
                name
            });
            if offset < end {
                return table;
            }
        } else if offset < end {
            let key = trimmed
                .split_once('=')
                .map(|(k, _)| k.trim().trim_matches('"').to_string())
                .filter(|k| !k.is_empty() && !k.starts_with('#'));
            return match (table, key) {
                (Some(t), Some(k)) => Some(format!("{t}.{k}")),
                (t, k) => t.or(k),
            };
        }
        start = end;
    }
    table
}

/// `[a.b]` → ("a.b", false); `[[models]]` → ("models", true).
fn header(line: &str) -> Option<(String, bool)> {
    let clean = |s: &str| {
        s.split('.')
            .map(|p| p.trim().trim_matches('"'))
            .collect::<Vec<_>>()
            .join(".")
    };
    if let Some(rest) = line.strip_prefix("[[") {
        return rest.split_once("]]").map(|(name, _)| (clean(name), true));
    }
    let rest = line.strip_prefix('[')?;
    rest.split_once(']').map(|(name, _)| (clean(name), false))
}

#[cfg(test)]
mod tests {
    use super::{key_path_near, line_column};

    #[test]
    fn lines_and_columns_are_one_based() {
        let text = "a = 1\n[server]\nport = x\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, text.find('x').expect("x")), (3, 8));
    }

    #[test]
    fn key_paths_from_the_text() {
        let text = "[server]\nport = 1\n\n[[models]]\npath = \"a\"\n[[models]]\nstages = -1\n[profiles.fast]\n";
        let at = |needle: &str| key_path_near(text, text.find(needle).expect(needle));
        assert_eq!(at("1").as_deref(), Some("server.port"));
        assert_eq!(at("\"a\"").as_deref(), Some("models[0].path"));
        assert_eq!(at("-1").as_deref(), Some("models[1].stages"));
        assert_eq!(at("fast").as_deref(), Some("profiles.fast"));
    }
}
