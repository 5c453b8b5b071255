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

struct Compiled {
    before_html: Vec<(Regex, &'static str)>,
    after_html: Vec<(Regex, &'static str)>,
    after_unescape: Vec<(Regex, &'static str)>,
    tags: Regex,
    separators: Regex,
}

fn compiled() -> &'static Compiled {
    static CELL: OnceLock<Compiled> = OnceLock::new();
    CELL.get_or_init(|| {
        let compile = |steps: &[(&str, &'static str)]| {
            steps.iter().map(|(p, r)| (Regex::new(p).expect("valid caption regex"), *r)).collect::<Vec<_>>()
        };
        Compiled {
            before_html: compile(STEPS_BEFORE_HTML),
            after_html: compile(STEPS_AFTER_HTML),
            after_unescape: compile(STEPS_AFTER_UNESCAPE),
            tags: Regex::new(r"<[^>]*>").expect("valid"),
            separators: Regex::new(r"(?:\-|\_)").expect("valid"),
        }
    })
}

fn apply(text: String, steps: &[(Regex, &str)]) -> String {
    steps.iter().fold(text, |text, (regex, replacement)| {
        regex.replace_all(&text, |caps: &Captures| expand(caps, replacement)).into_owned()
    })
}

fn expand(caps: &Captures, replacement: &str) -> String {
    replacement.replace("$1", caps.get(1).map_or("", |m| m.as_str()))
}

/// `urllib.parse.unquote_plus`: `+` to space, `%XX` decoded as UTF-8 (invalid bytes replaced).
fn unquote_plus(text: &str) -> String {
    let bytes = text.replace('+', " ").into_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decodes common named and all numeric HTML entities.
fn html_unescape(text: &str) -> String {
    static ENTITY: OnceLock<Regex> = OnceLock::new();
    let entity =
        ENTITY.get_or_init(|| Regex::new(r"&(#[0-9]+|#[xX][0-9a-fA-F]+|amp|lt|gt|quot|apos|nbsp);?").expect("valid"));
    entity
        .replace_all(text, |caps: &Captures| {
            let name = &caps[1];
            let decoded = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                _ if name.starts_with("#x") || name.starts_with("#X") => {
                    u32::from_str_radix(&name[2..], 16).ok().and_then(char::from_u32)
                }
                _ => name[1..].parse::<u32>().ok().and_then(char::from_u32),
            };
            decoded.map_or_else(|| caps[0].to_string(), String::from)
        })
        .into_owned()
}

fn clean_once(caption: &str) -> String {
    let c = compiled();
    let caption = unquote_plus(caption);
    let caption = crate::text::lower_strip(&caption);
    let caption = apply(caption, &c.before_html);
    let caption = html_unescape(&c.tags.replace_all(&caption, "")); // BeautifulSoup(...).text
    let mut caption = apply(caption, &c.after_html);
    if c.separators.find_iter(&caption).count() > 3 {
        caption = c.separators.replace_all(&caption, " ").into_owned();
    }
    let caption = html_unescape(&html_unescape(&caption));
    apply(caption, &c.after_unescape).trim().to_string()
}

/// diffusers' `clean_caption=True` preprocessing: `_clean_caption` applied twice.
pub fn clean_caption(caption: &str) -> String {
    clean_once(&clean_once(caption))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_urls_handles_and_ids() {
        assert_eq!(clean_caption("A Cat on https://example.com/x.png by @someone"), "a cat on by");
        assert_eq!(clean_caption("photo_of_a_red_car_123456"), "photo of a red car");
        assert_eq!(unquote_plus("a+b%20c%zz"), "a b c%zz");
        assert_eq!(html_unescape("&amp;lt; &#65;&#x42;"), "&lt; AB");
    }
}
