//! The original PixArt repository's names for the transformer's layers (its `.pth` checkpoints,
//! their safetensors conversions, LoRAs trained on them) and diffusers' names for the same
//! layers, as diffusers' `convert_pixart_sigma_to_diffusers.py` maps them: packed `attn.qkv`
//! holds `to_q`, `to_k`, `to_v` stacked along the output dimension, packed
//! `cross_attn.kv_linear` holds `to_k`, `to_v`.

/// Where one original layer goes: diffusers layers, each taking its share of the output rows
/// (one for most layers; three for `attn.qkv`, two for `cross_attn.kv_linear`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMap {
    /// The diffusers layers, in the order their rows are stacked.
    pub targets: Vec<String>,
}

/// The diffusers layers an original layer name (without `.weight`/`.bias`) stands for, or
/// `None` for a name that is no layer of the original layout.
pub fn diffusers_layers(original: &str) -> Option<LayerMap> {
    let one = |name: &str| Some(LayerMap { targets: vec![name.to_string()] });
    match original {
        "x_embedder.proj" => return one("pos_embed.proj"),
        "y_embedder.y_proj.fc1" => return one("caption_projection.linear_1"),
        "y_embedder.y_proj.fc2" => return one("caption_projection.linear_2"),
        "t_embedder.mlp.0" => return one("adaln_single.emb.timestep_embedder.linear_1"),
        "t_embedder.mlp.2" => return one("adaln_single.emb.timestep_embedder.linear_2"),
        "t_block.1" => return one("adaln_single.linear"),
        "final_layer.linear" => return one("proj_out"),
        _ => {}
    }
    let rest = original.strip_prefix("blocks.")?;
    let (block, layer) = rest.split_once('.')?;
    let block: usize = block.parse().ok()?;
    let base = format!("transformer_blocks.{block}");
    let names: &[&str] = match layer {
        "attn.qkv" => &["attn1.to_q", "attn1.to_k", "attn1.to_v"],
        "attn.proj" => &["attn1.to_out.0"],
        "cross_attn.q_linear" => &["attn2.to_q"],
        "cross_attn.kv_linear" => &["attn2.to_k", "attn2.to_v"],
        "cross_attn.proj" => &["attn2.to_out.0"],
        "mlp.fc1" => &["ff.net.0.proj"],
        "mlp.fc2" => &["ff.net.2"],
        _ => return None,
    };
    Some(LayerMap { targets: names.iter().map(|n| format!("{base}.{n}")).collect() })
}

/// What to do with one tensor of an original-layout checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginalTensor {
    /// A layer's weight or bias (`suffix`), going to these diffusers layers.
    Layer {
        /// The diffusers layers.
        map: LayerMap,
        /// `weight` or `bias`.
        suffix: String,
    },
    /// A parameter with a diffusers name of its own (the modulation tables).
    Renamed(String),
    /// Not needed: the fixed sin-cos position table (`pos_embed`, computed here) and the
    /// training-time null caption (`y_embedder.y_embedding`).
    Unused,
    /// A part no PixArt-Σ model has: `why`.
    Unsupported(&'static str),
    /// No tensor of the original layout.
    Unknown,
}

/// Classifies one tensor name of an original-layout checkpoint.
pub fn classify(name: &str) -> OriginalTensor {
    if name == "pos_embed" || name == "y_embedder.y_embedding" {
        return OriginalTensor::Unused;
    }
    if name.starts_with("csize_embedder.") || name.starts_with("ar_embedder.") {
        return OriginalTensor::Unsupported("resolution/aspect-ratio embedders (PixArt-α 1024, not Σ)");
    }
    if name == "final_layer.scale_shift_table" {
        return OriginalTensor::Renamed("scale_shift_table".into());
    }
    if let Some(block) = name.strip_prefix("blocks.").and_then(|r| r.strip_suffix(".scale_shift_table")) {
        return OriginalTensor::Renamed(format!("transformer_blocks.{block}.scale_shift_table"));
    }
    if name.contains(".attn.sr.") || name.contains(".attn.norm.") {
        return OriginalTensor::Unsupported("KV-token compression (attn.sr / attn.norm), never released for PixArt-Σ");
    }
    let Some((layer, suffix)) = name.rsplit_once('.') else { return OriginalTensor::Unknown };
    match (diffusers_layers(layer), suffix) {
        (Some(map), "weight" | "bias") => OriginalTensor::Layer { map, suffix: suffix.to_string() },
        _ => OriginalTensor::Unknown,
    }
}

/// Whether tensor names look like the original layout (rather than diffusers').
pub fn is_original_layout<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|n| n.starts_with("blocks.") || n.starts_with("x_embedder.") || n.starts_with("t_block."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_layers_go_to_their_diffusers_layers_in_order() {
        assert_eq!(
            diffusers_layers("blocks.3.attn.qkv").unwrap().targets,
            ["transformer_blocks.3.attn1.to_q", "transformer_blocks.3.attn1.to_k", "transformer_blocks.3.attn1.to_v"]
        );
        assert_eq!(diffusers_layers("blocks.0.cross_attn.kv_linear").unwrap().targets.len(), 2);
        assert_eq!(diffusers_layers("t_block.1").unwrap().targets, ["adaln_single.linear"]);
        assert!(diffusers_layers("blocks.x.attn.qkv").is_none() && diffusers_layers("nothing").is_none());
        assert!(matches!(classify("blocks.1.attn.proj.bias"), OriginalTensor::Layer { .. }));
        assert_eq!(
            classify("blocks.1.scale_shift_table"),
            OriginalTensor::Renamed("transformer_blocks.1.scale_shift_table".into())
        );
        assert_eq!(classify("pos_embed"), OriginalTensor::Unused);
        assert!(matches!(classify("blocks.0.attn.sr.weight"), OriginalTensor::Unsupported(_)));
        assert!(matches!(classify("ar_embedder.mlp.0.weight"), OriginalTensor::Unsupported(_)));
        assert_eq!(classify("blocks.0.attn.qkv.scale"), OriginalTensor::Unknown);
    }
}
