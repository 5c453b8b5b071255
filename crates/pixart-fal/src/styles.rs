//! fal's style templates: a prompt template with `{prompt}` and a negative prompt that is
//! prepended to the user's negative prompt.

use crate::field_error::FieldError;

/// One of the style presets fal's `pixart-sigma` endpoint accepts (the request's `style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Style {
    /// `(No style)`: the prompt as it is (the default).
    #[default]
    NoStyle,
    /// `Cinematic`.
    Cinematic,
    /// `Photographic`.
    Photographic,
    /// `Anime`.
    Anime,
    /// `Manga`.
    Manga,
    /// `Digital Art`.
    DigitalArt,
    /// `Pixel art`.
    PixelArt,
    /// `Fantasy art`.
    FantasyArt,
    /// `Neonpunk`.
    Neonpunk,
    /// `3D Model`.
    Model3d,
}

impl Style {
    /// Every style, in fal's order; the first is the default.
    pub const ALL: [Self; 10] = [
        Self::NoStyle,
        Self::Cinematic,
        Self::Photographic,
        Self::Anime,
        Self::Manga,
        Self::DigitalArt,
        Self::PixelArt,
        Self::FantasyArt,
        Self::Neonpunk,
        Self::Model3d,
    ];

    /// The name as fal spells it (the request's `style` value).
    pub fn name(self) -> &'static str {
        self.templates().0
    }

    /// `(name, prompt template with {prompt}, negative prompt)`.
    fn templates(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::NoStyle => (
                "(No style)",
                "{prompt}",
                "",
            ),
            Self::Cinematic => (
                "Cinematic",
                "cinematic still {prompt} . emotional, harmonious, vignette, highly detailed, high budget, bokeh, cinemascope, moody, epic, gorgeous, film grain, grainy",
                "anime, cartoon, graphic, text, painting, crayon, graphite, abstract, glitch, deformed, mutated, ugly, disfigured",
            ),
            Self::Photographic => (
                "Photographic",
                "cinematic photo {prompt} . 35mm photograph, film, bokeh, professional, 4k, highly detailed",
                "drawing, painting, crayon, sketch, graphite, impressionist, noisy, blurry, soft, deformed, ugly",
            ),
            Self::Anime => (
                "Anime",
                "anime artwork {prompt} . anime style, key visual, vibrant, studio anime,  highly detailed",
                "photo, deformed, black and white, realism, disfigured, low contrast",
            ),
            Self::Manga => (
                "Manga",
                "manga style {prompt} . vibrant, high-energy, detailed, iconic, Japanese comic style",
                "ugly, deformed, noisy, blurry, low contrast, realism, photorealistic, Western comic style",
            ),
            Self::DigitalArt => (
                "Digital Art",
                "concept art {prompt} . digital artwork, illustrative, painterly, matte painting, highly detailed",
                "photo, photorealistic, realism, ugly",
            ),
            Self::PixelArt => (
                "Pixel art",
                "pixel-art {prompt} . low-res, blocky, pixel art style, 8-bit graphics",
                "sloppy, messy, blurry, noisy, highly detailed, ultra textured, photo, realistic",
            ),
            Self::FantasyArt => (
                "Fantasy art",
                "ethereal fantasy concept art of  {prompt} . magnificent, celestial, ethereal, painterly, epic, majestic, magical, fantasy art, cover art, dreamy",
                "photographic, realistic, realism, 35mm film, dslr, cropped, frame, text, deformed, glitch, noise, noisy, off-center, deformed, cross-eyed, closed eyes, bad anatomy, ugly, disfigured, sloppy, duplicate, mutated, black and white",
            ),
            Self::Neonpunk => (
                "Neonpunk",
                "neonpunk style {prompt} . cyberpunk, vaporwave, neon, vibes, vibrant, stunningly beautiful, crisp, detailed, sleek, ultramodern, magenta highlights, dark purple shadows, high contrast, cinematic, ultra detailed, intricate, professional",
                "painting, drawing, illustration, glitch, deformed, mutated, cross-eyed, ugly, disfigured",
            ),
            Self::Model3d => (
                "3D Model",
                "professional 3d model {prompt} . octane render, highly detailed, volumetric, dramatic lighting",
                "ugly, deformed, noisy, low poly, blurry, painting",
            ),
        }
    }

    /// The style's prompt template; `{prompt}` is replaced by the user's prompt.
    pub fn prompt_template(self) -> &'static str {
        self.templates().1
    }

    /// The style's negative prompt.
    pub fn negative_prompt(self) -> &'static str {
        self.templates().2
    }

    /// Looks a style up by its exact name.
    pub fn by_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The style's prompt and negative prompt for a user's prompt and negative prompt.
    pub fn apply(self, prompt: &str, negative: &str) -> (String, String) {
        (self.prompt_template().replace("{prompt}", prompt), format!("{}{}", self.negative_prompt(), negative))
    }

    /// The allowed names, quoted, for error messages.
    pub fn names() -> String {
        Self::ALL.map(|s| format!("{:?}", s.name())).join(", ")
    }
}

impl std::fmt::Display for Style {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Style {
    /// The error for a name that is not a style.
    pub(crate) fn error() -> FieldError {
        FieldError::value("style", format!("must be one of {}", Self::names()))
    }
}

impl std::str::FromStr for Style {
    type Err = FieldError;
    fn from_str(name: &str) -> Result<Self, FieldError> {
        Self::by_name(name).ok_or_else(Self::error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_templates_apply() {
        for style in Style::ALL {
            assert_eq!(Style::by_name(style.name()), Some(style));
            assert!(style.prompt_template().contains("{prompt}"), "{style}");
        }
        assert_eq!(Style::default().name(), "(No style)");
        let (p, n) = Style::Anime.apply("a cat", "blurry");
        assert!(p.starts_with("anime artwork a cat ."), "{p}");
        assert!(n.ends_with("low contrastblurry"), "{n}");
        let error = "Nope".parse::<Style>().unwrap_err();
        assert_eq!(error.field, "style");
        assert!(error.message.contains("\"3D Model\""), "{error}");
    }
}
