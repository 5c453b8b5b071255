//! Perturbed-attention guidance as diffusers' `PixArtSigmaPAGPipeline` runs it: which blocks a
//! request's layer patterns select, and how the extra branch enters the guidance.

use candle_core::Tensor;

use crate::invalid_parameter::InvalidParameter;

/// The blocks whose self-attention the patterns select, as diffusers' `_set_pag_attn_processor`
/// selects them: every self-attention layer whose name (`names[i]`, e.g.
/// `transformer_blocks.1.attn1`) the pattern is found in (`re.search`), unless both the pattern
/// and the name end in the same number after their last dot. Like diffusers, `blocks.1` is found
/// in `transformer_blocks.10.attn1` too (on a 28-block model it selects blocks 1 and 10–19);
/// `blocks\.1\.` selects block 1 alone. A pattern that selects nothing, or is not a regular
/// expression, is refused naming `pag_applied_layers[i]`.
pub fn select_blocks(names: &[String], patterns: &[String]) -> Result<Vec<usize>, InvalidParameter> {
    let mut blocks = Vec::new();
    for (i, pattern) in patterns.iter().enumerate() {
        let field = format!("pag_applied_layers[{i}]");
        let regex = fancy_regex::Regex::new(pattern)
            .map_err(|e| InvalidParameter::new(field.clone(), format!("is not a regular expression: {e}")))?;
        let mut found = false;
        for (block, name) in names.iter().enumerate() {
            let matches = regex
                .is_match(name)
                .map_err(|e| InvalidParameter::new(field.clone(), format!("cannot be matched: {e}")))?;
            if matches && !same_trailing_number(pattern, name) {
                found = true;
                if !blocks.contains(&block) {
                    blocks.push(block);
                }
            }
        }
        if !found {
            return Err(InvalidParameter::new(
                field,
                format!(
                    "{pattern:?} matches no self-attention layer of this model (its layers are {} to {})",
                    names.first().map_or("none", String::as_str),
                    names.last().map_or("none", String::as_str)
                ),
            ));
        }
    }
    blocks.sort_unstable();
    Ok(blocks)
}

/// diffusers' `is_fake_integral_match`: both end, after their last dot, in the same number.
fn same_trailing_number(pattern: &str, name: &str) -> bool {
    let last = |s: &str| s.rsplit('.').next().unwrap_or_default().to_string();
    let numeric = |s: &str| !s.is_empty() && s.chars().all(char::is_numeric);
    let (p, n) = (last(pattern), last(name));
    numeric(&p) && numeric(&n) && p == n
}

/// The guided noise from the model's output on the batch `[uncond?, text, perturbed]` (each
/// `n` rows): with classifier-free guidance `uncond + g·(text − uncond) + s·(text − perturbed)`,
/// without it `text + s·(text − perturbed)`, in that order of operations (diffusers').
pub fn guide(out: &Tensor, n: usize, guidance_scale: Option<f64>, pag_scale: f64) -> candle_core::Result<Tensor> {
    match guidance_scale {
        Some(g) => {
            let (uncond, text, perturbed) = (out.narrow(0, 0, n)?, out.narrow(0, n, n)?, out.narrow(0, 2 * n, n)?);
            let cfg = (&uncond + ((&text - &uncond)? * g)?)?;
            cfg + ((text - perturbed)? * pag_scale)?
        }
        None => {
            let (text, perturbed) = (out.narrow(0, 0, n)?, out.narrow(0, n, n)?);
            &text + ((&text - perturbed)? * pag_scale)?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trailing_number_rule_is_diffusers() {
        assert!(same_trailing_number("blocks.1", "transformer_blocks.1"));
        assert!(!same_trailing_number("blocks.1", "transformer_blocks.1.attn1"));
        let names: Vec<String> = (0..3).map(|i| format!("transformer_blocks.{i}.attn1")).collect();
        assert_eq!(select_blocks(&names, &["blocks.(0|2)".into()]).unwrap(), [0, 2]);
        assert_eq!(select_blocks(&names, &[]).unwrap(), Vec::<usize>::new());
        let refused = select_blocks(&names, &["blocks.1".into(), "mid".into()]).unwrap_err();
        assert_eq!(refused.parameter, "pag_applied_layers[1]");
        assert_eq!(select_blocks(&names, &["(".into()]).unwrap_err().parameter, "pag_applied_layers[0]");
    }
}
