//! fal's style templates: a prompt template with `{prompt}` and a negative prompt that is
//! prepended to the user's negative prompt.

/// One style preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// The name as fal spells it (the request's `style` value).
    pub name: &'static str,
    /// The prompt template; `{prompt}` is replaced by the user's prompt.
    pub prompt: &'static str,
    /// The style's negative prompt.
    pub negative: &'static str,
}

/// Every style fal's `pixart-sigma` endpoint accepts; the first is the default.
pub const STYLES: &[Style] = &[
    Style { name: "(No style)", prompt: "{prompt}", negative: "" },
    Style {
        name: "Cinematic",
        prompt: "cinematic still {prompt} . emotional, harmonious, vignette, highly detailed, high budget, bokeh, cinemascope, moody, epic, gorgeous, film grain, grainy",
        negative: "anime, cartoon, graphic, text, painting, crayon, graphite, abstract, glitch, deformed, mutated, ugly, disfigured",
    },
    Style {
        name: "Photographic",
        prompt: "cinematic photo {prompt} . 35mm photograph, film, bokeh, professional, 4k, highly detailed",
        negative: "drawing, painting, crayon, sketch, graphite, impressionist, noisy, blurry, soft, deformed, ugly",
    },
    Style {
        name: "Anime",
        prompt: "anime artwork {prompt} . anime style, key visual, vibrant, studio anime,  highly detailed",
        negative: "photo, deformed, black and white, realism, disfigured, low contrast",
    },
    Style {
        name: "Manga",
        prompt: "manga style {prompt} . vibrant, high-energy, detailed, iconic, Japanese comic style",
        negative: "ugly, deformed, noisy, blurry, low contrast, realism, photorealistic, Western comic style",
    },
    Style {
        name: "Digital Art",
        prompt: "concept art {prompt} . digital artwork, illustrative, painterly, matte painting, highly detailed",
        negative: "photo, photorealistic, realism, ugly",
    },
    Style {
        name: "Pixel art",
        prompt: "pixel-art {prompt} . low-res, blocky, pixel art style, 8-bit graphics",
        negative: "sloppy, messy, blurry, noisy, highly detailed, ultra textured, photo, realistic",
    },
    Style {
        name: "Fantasy art",
        prompt: "ethereal fantasy concept art of  {prompt} . magnificent, celestial, ethereal, painterly, epic, majestic, magical, fantasy art, cover art, dreamy",
        negative: "photographic, realistic, realism, 35mm film, dslr, cropped, frame, text, deformed, glitch, noise, noisy, off-center, deformed, cross-eyed, closed eyes, bad anatomy, ugly, disfigured, sloppy, duplicate, mutated, black and white",
    },
    Style {
        name: "Neonpunk",
        prompt: "neonpunk style {prompt} . cyberpunk, vaporwave, neon, vibes, vibrant, stunningly beautiful, crisp, detailed, sleek, ultramodern, magenta highlights, dark purple shadows, high contrast, cinematic, ultra detailed, intricate, professional",
        negative: "painting, drawing, illustration, glitch, deformed, mutated, cross-eyed, ugly, disfigured",
    },
    Style {
        name: "3D Model",
        prompt: "professional 3d model {prompt} . octane render, highly detailed, volumetric, dramatic lighting",
        negative: "ugly, deformed, noisy, low poly, blurry, painting",
    },
];

impl Style {
    /// Looks a style up by its exact name.
    pub fn by_name(name: &str) -> Option<&'static Style> {
        STYLES.iter().find(|s| s.name == name)
    }

    /// The style's prompt and negative prompt for a user's prompt and negative prompt.
    pub fn apply(&self, prompt: &str, negative: &str) -> (String, String) {
        (self.prompt.replace("{prompt}", prompt), format!("{}{}", self.negative, negative))
    }

    /// The allowed names, for error messages.
    pub fn names() -> String {
        STYLES.iter().map(|s| format!("{:?}", s.name)).collect::<Vec<_>>().join(", ")
    }
}
