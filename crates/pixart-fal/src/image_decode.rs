//! Input pictures from untrusted bytes: PNG, JPEG or WebP, decoded within limits (pixel count,
//! sides and allocation, checked from the header before any pixel is decoded), turned upright
//! by their EXIF orientation and to 8-bit RGB — what diffusers' `load_image` does with PIL
//! (`exif_transpose`, then `convert("RGB")`, which drops an alpha channel).

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
use pixart_pipeline::RgbImage;

/// Limits on decoding one picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// The most pixels (width × height).
    pub max_pixels: u64,
    /// The longest side.
    pub max_side: u32,
    /// The most bytes the decoder may allocate.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    /// PIL's decompression-bomb threshold (`Image.MAX_IMAGE_PIXELS`, 89 478 485 pixels), sides
    /// up to 32 768, and 1 GiB of decoder memory.
    fn default() -> Self {
        Self { max_pixels: 89_478_485, max_side: 32_768, max_alloc: 1 << 30 }
    }
}

/// Why a picture could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageDecodeError {
    /// Not a PNG, JPEG or WebP file.
    #[error("is not a PNG, JPEG or WebP picture")]
    UnknownFormat,
    /// Larger than the limits allow.
    #[error("is {width}x{height}: more than the {max_pixels} pixels (or {max_side} a side) accepted")]
    TooLarge {
        /// Its width.
        width: u32,
        /// Its height.
        height: u32,
        /// The pixel limit.
        max_pixels: u64,
        /// The side limit.
        max_side: u32,
    },
    /// Corrupt, truncated, or needing more memory than allowed.
    #[error("cannot be decoded as {format}")]
    Decode {
        /// The format it claimed to be.
        format: &'static str,
        /// What the decoder said.
        source: image::ImageError,
    },
}

/// The format's name, for messages.
fn format_name(format: ImageFormat) -> Option<&'static str> {
    match format {
        ImageFormat::Png => Some("PNG"),
        ImageFormat::Jpeg => Some("JPEG"),
        ImageFormat::WebP => Some("WebP"),
        _ => None,
    }
}

/// Decodes a PNG, JPEG or WebP file within `limits` to upright 8-bit RGB: EXIF orientation
/// applied, alpha dropped, grayscale and palettes expanded, 16-bit channels rounded to 8 bits.
pub fn decode_image(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, ImageDecodeError> {
    let reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|_| ImageDecodeError::UnknownFormat)?;
    let format = reader.format().and_then(format_name).ok_or(ImageDecodeError::UnknownFormat)?;
    let failed = |source| ImageDecodeError::Decode { format, source };
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    decoder_limits.max_alloc = Some(limits.max_alloc);
    let mut reader = reader;
    reader.limits(decoder_limits);
    let mut decoder = reader.into_decoder().map_err(|e| match (&e, header_size(bytes)) {
        (image::ImageError::Limits(_), Some((width, height))) => {
            ImageDecodeError::TooLarge { width, height, max_pixels: limits.max_pixels, max_side: limits.max_side }
        }
        _ => failed(e),
    })?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > limits.max_pixels || width.max(height) > limits.max_side {
        return Err(ImageDecodeError::TooLarge {
            width,
            height,
            max_pixels: limits.max_pixels,
            max_side: limits.max_side,
        });
    }
    let orientation = decoder.orientation().map_err(failed)?;
    let mut picture = DynamicImage::from_decoder(decoder).map_err(failed)?;
    picture.apply_orientation(orientation);
    let rgb = picture.into_rgb8();
    Ok(RgbImage { width: rgb.width(), height: rgb.height(), pixels: rgb.into_raw() })
}

/// The size a picture's header claims, read without limits (nothing is decoded).
fn header_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok()?;
    reader.no_limits();
    reader.into_dimensions().ok()
}

/// The bytes of a `data:` URI (`data:[<type>][;base64],<data>`; base64 or percent-encoded).
pub fn data_uri_bytes(uri: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let rest = uri.strip_prefix("data:").ok_or("is not a data: URI")?;
    let (header, data) = rest.split_once(',').ok_or("is a data: URI without a comma before its data")?;
    if header.split(';').any(|part| part.eq_ignore_ascii_case("base64")) {
        let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact.trim_end_matches('='))
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(compact.trim_end_matches('=')))
            .map_err(|e| format!("is a data: URI whose base64 is invalid: {e}"))
    } else {
        Ok(percent_encoding::percent_decode_str(data).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_uris_in_both_encodings() {
        assert_eq!(data_uri_bytes("data:image/png;base64,aGVsbG8=").unwrap(), b"hello");
        assert_eq!(data_uri_bytes("data:image/png;base64,aGVsbG8").unwrap(), b"hello");
        assert_eq!(data_uri_bytes("data:,a%20b").unwrap(), b"a b");
        assert!(data_uri_bytes("data:image/png;base64,@@@").is_err());
        assert!(data_uri_bytes("http://x").is_err());
    }

    #[test]
    fn garbage_and_bombs_are_refused_by_name() {
        let limits = DecodeLimits::default();
        assert!(matches!(decode_image(b"not an image", &limits), Err(ImageDecodeError::UnknownFormat)));
        // A PNG header claiming 100000×100000 pixels, with a few bytes of data behind it.
        let mut bomb = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut bomb, 100_000, 100_000);
            encoder.set_color(png::ColorType::Rgb);
            let mut writer = encoder.write_header().unwrap();
            writer.write_chunk(png::chunk::IDAT, &[0x78, 0x9c, 0x03, 0x00]).unwrap();
        }
        let refused = decode_image(&bomb, &limits).unwrap_err();
        assert!(matches!(refused, ImageDecodeError::TooLarge { width: 100_000, height: 100_000, .. }), "{refused}");
        // A real picture over the pixel limit is refused before its pixels are decoded.
        let mut png = Vec::new();
        let mut encoder = png::Encoder::new(&mut png, 300, 200);
        encoder.set_color(png::ColorType::Rgba);
        encoder.write_header().unwrap().write_image_data(&vec![9; 300 * 200 * 4]).unwrap();
        let small = DecodeLimits { max_pixels: 50_000, ..limits };
        assert!(matches!(decode_image(&png, &small), Err(ImageDecodeError::TooLarge { width: 300, .. })));
        // Within the limits: RGBA becomes RGB, the alpha dropped.
        let picture = decode_image(&png, &limits).unwrap();
        assert_eq!((picture.width, picture.height, picture.pixels.len()), (300, 200, 300 * 200 * 3));
        assert!(picture.pixels.iter().all(|&v| v == 9));
        // Truncated data is a decode error naming the format.
        let truncated = decode_image(&png[..png.len() / 2], &limits).unwrap_err();
        assert!(truncated.to_string().contains("PNG"), "{truncated}");
    }
}
