//! The size rule: every valid request size comes out at exactly that size, on every bin table and
//! without one, and wherever diffusers' `resize_and_crop_tensor` gives the requested size the plan
//! is diffusers' to the pixel. Pure size arithmetic (no generation), so the grid is dense.

use candle_core::{DType, Device, Tensor};
use pixart_pipeline::image::resize_and_crop;
use pixart_pipeline::sizes::AspectRatioBins;
use pixart_pipeline::{Dimensions, SizePlan};

/// Every table diffusers has, and a checkpoint without one (`None`, 16-pixel multiples).
fn tables() -> Vec<(String, Option<AspectRatioBins>)> {
    let mut tables: Vec<(String, Option<AspectRatioBins>)> = [32, 64, 128, 256]
        .into_iter()
        .map(|s| {
            let bins = AspectRatioBins::for_sample_size(s).unwrap();
            (format!("{} table", bins.resolution), Some(bins))
        })
        .collect();
    tables.push(("no table".into(), None));
    tables
}

/// All sides 16–600 in steps of 1, then to 4096 in steps of 13, plus the edges.
fn sides() -> Vec<u32> {
    let mut sides: Vec<u32> = (16..=600).chain((601..=4096).step_by(13)).collect();
    sides.extend([4095, 4096, 17, 1023, 1025, 2047, 2049]);
    sides.sort_unstable();
    sides.dedup();
    sides
}

/// diffusers' arithmetic in Python floats: `ratio = max(h/H, w/W)`, `int(H·ratio)`, `int(W·ratio)`.
fn diffusers_resize(generated: (u32, u32), requested: (u32, u32)) -> (u32, u32) {
    let ((gw, gh), (w, h)) = (generated, requested);
    let ratio = (f64::from(h) / f64::from(gh)).max(f64::from(w) / f64::from(gw));
    ((f64::from(gw) * ratio) as u32, (f64::from(gh) * ratio) as u32)
}

fn check(plan: &SizePlan, bins: Option<AspectRatioBins>, w: u32, h: u32) -> Result<bool, String> {
    let fail = |what: &str| Err(format!("{w}x{h}: {what}: {plan:?}"));
    if (plan.output.width(), plan.output.height()) != (w, h) {
        return fail("output is not the requested size");
    }
    if plan.generated.width % 16 != 0 || plan.generated.height % 16 != 0 {
        return fail("generated size is not a multiple of 16");
    }
    let (r, c) = (plan.resized, plan.crop_offset);
    if r.width < w || r.height < h || c.width + w > r.width || c.height + h > r.height {
        return fail("the crop leaves the resized image");
    }
    if (r.width - w) / 2 != c.width || (r.height - h) / 2 != c.height {
        return fail("the crop is not centred as diffusers centres it");
    }
    let short = match bins {
        None => {
            // Without a table: the request rounded up, no resampling.
            let up = |s: u32| s.div_ceil(16) * 16;
            if (plan.generated.width, plan.generated.height) != (up(w), up(h)) || plan.resized != plan.generated {
                return fail("not the requested size rounded up to 16");
            }
            false
        }
        Some(bins) => {
            let (bh, bw) = bins.classify(h, w);
            if (plan.generated.width, plan.generated.height) != (bw, bh) {
                return fail("not generated at diffusers' bin");
            }
            if (bw, bh) == (w, h) {
                if plan.resized != plan.generated {
                    return fail("resampled although the bin is the requested size");
                }
                false
            } else {
                let (dw, dh) = diffusers_resize((bw, bh), (w, h));
                let short = dw < w || dh < h;
                // Where diffusers is not short, its resize is ours exactly; where it is, ours
                // differs only on the short side, which is the requested length.
                let expected = (dw.max(w), dh.max(h));
                if (r.width, r.height) != expected {
                    return fail(&format!("resized to {}x{}, expected {expected:?}", r.width, r.height));
                }
                if short != plan.diffusers_output().is_some() {
                    return fail("diffusers_output disagrees");
                }
                short
            }
        }
    };
    Ok(short)
}

#[test]
fn every_size_on_every_table_comes_out_exact() {
    let sides = sides();
    for (name, bins) in tables() {
        let (mut total, mut short) = (0usize, 0usize);
        for &w in &sides {
            for &h in &sides {
                let requested = Dimensions::new(w, h).unwrap();
                let plan = SizePlan::new(requested, bins, 16);
                if check(&plan, bins, w, h).unwrap_or_else(|e| panic!("{name}: {e}")) {
                    short += 1;
                }
                total += 1;
            }
        }
        eprintln!("{name}: {total} sizes exact; diffusers would be one pixel short on {short}");
        if bins.is_some() {
            assert!(short > 0 && short * 10 < total, "{name}: {short} of {total} short sizes is implausible");
        }
    }
}

#[test]
fn the_reported_short_sizes_are_exact() {
    let small = AspectRatioBins::for_sample_size(32);
    let large = AspectRatioBins::for_sample_size(128);
    for (bins, w, h) in
        [(small, 64, 118), (small, 64, 222), (small, 68, 106), (small, 59, 16), (small, 104, 48), (large, 256, 386)]
    {
        let plan = SizePlan::new(Dimensions::new(w, h).unwrap(), bins, 16);
        let short = plan.diffusers_output().expect("diffusers is one pixel short here");
        assert!(short.width + 1 == w || short.height + 1 == h, "{w}x{h}: {short:?}");
        check(&plan, bins, w, h).unwrap();
    }
}

#[test]
fn extreme_sizes_and_aspect_ratios_plan_without_panicking() {
    for (_, bins) in tables() {
        for (w, h) in [(16, 16), (16, 4096), (4096, 16), (4096, 4096), (17, 4095), (4095, 17)] {
            let plan = SizePlan::new(Dimensions::new(w, h).unwrap(), bins, 16);
            check(&plan, bins, w, h).unwrap();
        }
        // Degenerate multiples (a checkpoint whose VAE and patch give 0 or an odd multiple).
        for multiple in [0, 1, 3, 48] {
            let plan = SizePlan::new(Dimensions::new(37, 91).unwrap(), bins, multiple);
            assert_eq!((plan.output.width(), plan.output.height()), (37, 91));
            assert_eq!(plan.generated.width % multiple.max(1), 0);
        }
    }
    assert!(Dimensions::new(15, 64).is_err() && Dimensions::new(64, 4097).is_err());
}

/// torch's `upsample_bilinear2d` (`align_corners=False`, no antialias) of one `[h, w]` plane, written
/// out independently of the pipeline's implementation: source `max((i + ½)·in/out − ½, 0)` in f32.
fn reference_bilinear(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let source = |i: usize, len: usize, out: usize| {
        let real = ((len as f32 / out as f32) * (i as f32 + 0.5) - 0.5).max(0.0);
        let low = (real.floor() as usize).min(len - 1);
        let high = (low + 1).min(len - 1);
        (low, high, real - low as f32)
    };
    let mut out = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        let (y0, y1, fy) = source(y, h, oh);
        for x in 0..ow {
            let (x0, x1, fx) = source(x, w, ow);
            let top = (1.0 - fx) * src[y0 * w + x0] + fx * src[y0 * w + x1];
            let bottom = (1.0 - fx) * src[y1 * w + x0] + fx * src[y1 * w + x1];
            out.push((1.0 - fy) * top + fy * bottom);
        }
    }
    out
}

/// The plan applied to real decoded-image tensors: the crop is the requested size, and where the
/// plan is diffusers' (not short) the pixels are diffusers' resize + centre crop.
#[test]
fn resize_and_crop_returns_the_requested_size() {
    let small = AspectRatioBins::for_sample_size(32);
    let mut sizes: Vec<(Option<AspectRatioBins>, u32, u32)> =
        vec![(small, 64, 118), (small, 64, 222), (small, 68, 106), (small, 59, 16), (small, 104, 48)];
    sizes.extend((16..=512).step_by(37).flat_map(|w| (16..=512).step_by(53).map(move |h| (small, w, h))));
    sizes.extend([(None, 17, 91), (None, 64, 64), (AspectRatioBins::for_sample_size(128), 256, 386)]);
    let mut compared = 0;
    for (bins, w, h) in sizes {
        let plan = SizePlan::new(Dimensions::new(w, h).unwrap(), bins, 16);
        let (gw, gh) = (plan.generated.width as usize, plan.generated.height as usize);
        let data: Vec<f32> = (0..2 * 3 * gh * gw).map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0).collect();
        let images = Tensor::from_vec(data, (2, 3, gh, gw), &Device::Cpu).unwrap();
        let out = resize_and_crop(&images, &plan).unwrap();
        assert_eq!(out.dims(), &[2, 3, h as usize, w as usize], "{w}x{h}");
        assert_eq!(out.dtype(), DType::F32);
        if plan.diffusers_output().is_some() {
            continue; // diffusers' own result is one pixel short here: nothing to compare with
        }
        // diffusers: resize to (⌊H·ratio⌋, ⌊W·ratio⌋) unless the bin is the request, then crop;
        // without a table, no resampling.
        let (rw, rh) = if bins.is_none() || (gw, gh) == (w as usize, h as usize) {
            (gw, gh)
        } else {
            let (dw, dh) = diffusers_resize((gw as u32, gh as u32), (w, h));
            (dw as usize, dh as usize)
        };
        let planes = images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let resized: Vec<f32> = if (rw, rh) == (gw, gh) {
            planes
        } else {
            planes.chunks_exact(gh * gw).flat_map(|p| reference_bilinear(p, gh, gw, rh, rw)).collect()
        };
        let resized = Tensor::from_vec(resized, (2, 3, rh, rw), &Device::Cpu).unwrap();
        let (x0, y0) = ((rw - w as usize) / 2, (rh - h as usize) / 2);
        let expected = resized.narrow(2, y0, h as usize).unwrap().narrow(3, x0, w as usize).unwrap();
        let diff = (out - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-6, "{w}x{h}: {diff}");
        compared += 1;
    }
    assert!(compared > 50, "only {compared} sizes compared");
}
