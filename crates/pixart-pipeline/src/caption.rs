//! diffusers' optional caption cleaning (`clean_caption=True`, `_clean_caption` applied twice):
//! URLs, HTML, @handles, CJK blocks, dashes and quotes normalised, ids, file names, shop spam and
//! stray punctuation removed.
//!
//! Differences from diffusers, by design of the dependencies it uses:
//! * `ftfy.fix_text` (mojibake repair) is not applied: text that is already valid Unicode passes
//!   through it unchanged, so only mis-decoded input such as `Ã©` differs.
//! * HTML is removed by dropping `<…>` tags instead of BeautifulSoup's parser, and entities are
//!   decoded for the common named ones (`&amp; &lt; &gt; &quot; &apos; &nbsp;`) and numeric ones
//!   instead of Python's full HTML5 table.

use std::sync::OnceLock;

use fancy_regex::{Captures, Regex};

/// `(pattern, replacement)` pairs applied in order; `$1` refers to the first group.
const STEPS_BEFORE_HTML: &[(&str, &str)] = &[
    ("<person>", "person"),
    (
        r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",
        "",
    ),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))", ""),
];

const STEPS_AFTER_HTML: &[(&str, &str)] = &[
    (r"@[\w\d]+\b", ""),
    (r"[\x{31c0}-\x{31ef}]+", ""),
    (r"[\x{31f0}-\x{31ff}]+", ""),
    (r"[\x{3200}-\x{32ff}]+", ""),
    (r"[\x{3300}-\x{33ff}]+", ""),
    (r"[\x{3400}-\x{4dbf}]+", ""),
    (r"[\x{4dc0}-\x{4dff}]+", ""),
    (r"[\x{4e00}-\x{9fff}]+", ""),
    (
        r"[\x{002D}\x{058A}\x{05BE}\x{1400}\x{1806}\x{2010}-\x{2015}\x{2E17}\x{2E1A}\x{2E3A}\x{2E3B}\x{2E40}\x{301C}\x{3030}\x{30A0}\x{FE31}\x{FE32}\x{FE58}\x{FE63}\x{FF0D}]+",
        "-",
    ),
    ("[`´«»“”¨]", "\""),
    ("[‘’]", "'"),
    ("&quot;?", ""),
    ("&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),
    (r"\d:\d\d\s+$", ""),
    (r"\\n", " "),
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),
    (r#"["']{2,}"#, "\""),
    (r"[\.]{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}", " "),
    (r"\s+\.\s+", " "),
];

const STEPS_AFTER_UNESCAPE: &[(&str, &str)] = &[
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
    (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", "$1 "),
    (r"\s+", " "),
    (r#"^["']([\w\W]+)["']$"#, "$1"),
    (r"^['\_,\-\:;]", ""),
    (r"['\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
];

/// Caption cleaning failed: the text made a pattern exceed fancy-regex's backtracking limit, or
/// a pattern does not compile.
#[derive(Debug, thiserror::Error)]
pub enum CaptionError {
    /// A pattern gave up on this text (fancy-regex stops after a million backtracking steps).
    #[error("caption cleaning gave up on this text (pattern {pattern:?}): {source}")]
    Regex {
        /// The pattern.
        pattern: &'static str,
        /// fancy-regex's error.
        source: fancy_regex::Error,
    },
    /// A built-in pattern does not compile (a bug; reported, never a panic).
    #[error("caption cleaning pattern {pattern:?} does not compile: {message}")]
    Pattern {
        /// The pattern.
        pattern: &'static str,
        /// fancy-regex's message.
        message: String,
    },
}

struct Step {
    pattern: &'static str,
    regex: Regex,
    replacement: &'static str,
}

struct Compiled {
    before_html: Vec<Step>,
    after_html: Vec<Step>,
    after_unescape: Vec<Step>,
    tags: Step,
    separators: Step,
    entity: Step,
}

fn compile(pattern: &'static str, replacement: &'static str) -> Result<Step, (&'static str, String)> {
    Regex::new(pattern).map(|regex| Step { pattern, regex, replacement }).map_err(|e| (pattern, e.to_string()))
}

fn compiled() -> Result<&'static Compiled, CaptionError> {
    static CELL: OnceLock<Result<Compiled, (&'static str, String)>> = OnceLock::new();
    let compiled = CELL.get_or_init(|| {
        let all = |steps: &[(&'static str, &'static str)]| -> Result<Vec<Step>, (&'static str, String)> {
            steps.iter().map(|(p, r)| compile(p, r)).collect()
        };
        Ok(Compiled {
            before_html: all(STEPS_BEFORE_HTML)?,
            after_html: all(STEPS_AFTER_HTML)?,
            after_unescape: all(STEPS_AFTER_UNESCAPE)?,
            tags: compile(r"<[^>]*>", "")?,
            separators: compile(r"(?:\-|\_)", " ")?,
            entity: compile(r"&(#[0-9]+|#[xX][0-9a-fA-F]+|amp|lt|gt|quot|apos|nbsp);?", "")?,
        })
    });
    compiled.as_ref().map_err(|(pattern, message)| CaptionError::Pattern { pattern, message: message.clone() })
}

impl Step {
    /// Every match replaced (`$1` is the first group), failing instead of panicking when the
    /// backtracking limit is hit.
    fn replace_all(&self, text: &str) -> Result<String, CaptionError> {
        self.replace_with(text, |caps: &Captures| {
            self.replacement.replace("$1", caps.get(1).map_or("", |m| m.as_str()))
        })
    }

    fn replace_with(&self, text: &str, rep: impl FnMut(&Captures) -> String) -> Result<String, CaptionError> {
        self.regex
            .try_replacen(text, 0, rep)
            .map(|c| c.into_owned())
            .map_err(|source| CaptionError::Regex { pattern: self.pattern, source })
    }

    /// How many matches, up to the first error.
    fn count(&self, text: &str) -> Result<usize, CaptionError> {
        let mut n = 0;
        for m in self.regex.find_iter(text) {
            m.map_err(|source| CaptionError::Regex { pattern: self.pattern, source })?;
            n += 1;
        }
        Ok(n)
    }
}

fn apply(text: String, steps: &[Step]) -> Result<String, CaptionError> {
    steps.iter().try_fold(text, |text, step| step.replace_all(&text))
}

/// `urllib.parse.unquote_plus`: `+` to space, `%XX` decoded as UTF-8 (invalid bytes replaced,
/// malformed escapes kept as they are).
fn unquote_plus(text: &str) -> String {
    percent_encoding::percent_decode_str(&text.replace('+', " ")).decode_utf8_lossy().into_owned()
}

/// Decodes common named and all numeric HTML entities.
fn html_unescape(text: &str) -> Result<String, CaptionError> {
    compiled()?.entity.replace_with(text, |caps: &Captures| {
        let whole = caps.get(0).map_or("", |m| m.as_str());
        let name = caps.get(1).map_or("", |m| m.as_str());
        let decoded = match name {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            _ => match name.strip_prefix("#x").or_else(|| name.strip_prefix("#X")) {
                Some(hex) => u32::from_str_radix(hex, 16).ok().and_then(char::from_u32),
                None => name.strip_prefix('#').and_then(|d| d.parse::<u32>().ok()).and_then(char::from_u32),
            },
        };
        decoded.map_or_else(|| whole.to_string(), String::from)
    })
}

fn clean_once(caption: &str) -> Result<String, CaptionError> {
    let c = compiled()?;
    let caption = unquote_plus(caption);
    let caption = crate::text::lower_strip(&caption);
    let caption = apply(caption, &c.before_html)?;
    let caption = html_unescape(&c.tags.replace_all(&caption)?)?; // BeautifulSoup(...).text
    let mut caption = apply(caption, &c.after_html)?;
    if c.separators.count(&caption)? > 3 {
        caption = c.separators.replace_all(&caption)?;
    }
    let caption = html_unescape(&html_unescape(&caption)?)?;
    Ok(apply(caption, &c.after_unescape)?.trim().to_string())
}

/// diffusers' `clean_caption=True` preprocessing: `_clean_caption` applied twice. Fails (never
/// panics) on text that makes a pattern exceed the regex engine's backtracking limit.
pub fn clean_caption(caption: &str) -> Result<String, CaptionError> {
    clean_once(&clean_once(caption)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_urls_handles_and_ids() {
        assert_eq!(clean_caption("A Cat on https://example.com/x.png by @someone").unwrap(), "a cat on by");
        assert_eq!(clean_caption("photo_of_a_red_car_123456").unwrap(), "photo of a red car");
        assert_eq!(unquote_plus("a+b%20c%zz"), "a b c%zz");
        assert_eq!(html_unescape("&amp;lt; &#65;&#x42; &#99999999;").unwrap(), "&lt; AB &#99999999;");
    }

    #[test]
    fn text_that_exhausts_the_backtracking_limit_is_an_error_not_a_panic() {
        // A long run the URL patterns backtrack over quadratically: fancy-regex gives up after a
        // million steps, and `replace_all` would panic there.
        let err = clean_caption(&"a-".repeat(2000)).unwrap_err();
        assert!(matches!(err, CaptionError::Regex { .. }), "{err}");
        assert!(err.to_string().contains("backtracking"), "{err}");
        // A shorter run is cleaned (dashes become spaces when there are more than three).
        assert_eq!(clean_caption(&"a-".repeat(100)).unwrap(), vec!["a"; 100].join(" "));
    }
}
