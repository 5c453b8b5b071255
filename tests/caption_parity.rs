//! Optional caption cleaning against diffusers' `clean_caption=True` preprocessing (with bs4 and
//! ftfy installed) on captions that exercise every rule. Text that needs ftfy's mojibake repair
//! or BeautifulSoup's full HTML parser is a documented difference and is not among the cases.

use pixart_pipeline::caption::clean_caption;
use pixart_suite::load_json;

#[test]
fn clean_caption_matches_diffusers() {
    let doc = load_json("captions.json");
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let bad: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            let (text, want) = (c["text"].as_str().unwrap(), c["cleaned"].as_str().unwrap());
            let got = clean_caption(text).unwrap();
            (got != want).then(|| format!("{text:?}: got {got:?}, want {want:?}"))
        })
        .collect();
    assert!(bad.is_empty(), "{} of {} captions differ:\n{}", bad.len(), cases.len(), bad.join("\n"));
}
