//! One image from the engine, written as a PNG: `cargo run --release --example generate [MODEL]`
//! (MODEL: a diffusers folder or a hub repo id; default the bundled tiny model, offline).
use pixart_pipeline::{GenerationParams, LoadOptions, Pipeline};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::env::args().nth(1).unwrap_or_else(|| "tests/fixtures/tiny-sigma-256".into());
    let pipeline = Pipeline::load(&model, &LoadOptions::default())?;
    let params = GenerationParams::new("a small cactus with a happy face").with_size(256, 256)?.with_seed(42);
    let generation = pipeline.generate(&params)?;
    let image = &generation.images[0];
    image::save_buffer("cactus.png", &image.pixels, image.width, image.height, image::ExtendedColorType::Rgb8)?;
    println!("cactus.png: {}x{}, seed {}, {:?}", image.width, image.height, generation.seed, generation.timings.total);
    Ok(())
}
