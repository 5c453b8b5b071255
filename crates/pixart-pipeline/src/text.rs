//! Prompt preprocessing as diffusers does it with `clean_caption=False`: Python's
//! `text.lower().strip()`.

/// Python's `str.isspace()`: Unicode White_Space plus the separators U+001C–U+001F, which
/// Python also strips.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `text.lower().strip()` with Python's semantics (full Unicode lowercase, final sigma
/// included, then stripping Python whitespace).
pub fn lower_strip(text: &str) -> String {
    text.to_lowercase().trim_matches(is_python_space).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_python() {
        assert_eq!(lower_strip("  A Cat\t\n"), "a cat");
        assert_eq!(lower_strip("\u{39f}\u{394}\u{39f}\u{3a3}"), "\u{3bf}\u{3b4}\u{3bf}\u{3c2}");
        assert_eq!(lower_strip("\u{1f}x\u{1c}"), "x");
        assert_eq!(lower_strip("\u{3000}Ünï\u{a0}"), "ünï");
    }
}
