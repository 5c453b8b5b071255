//! `pixart`: PixArt-Σ text-to-image from the terminal.

mod bench;
mod generate;
mod job_args;
mod model_args;
mod request_flags;
mod serve;
mod worker;

use clap::{Parser, Subcommand};

/// PixArt-Σ text-to-image in native Rust: the same images as diffusers for the same request and
/// seed, with fal's `fal-ai/pixart-sigma` request and response schema.
#[derive(Debug, Parser)]
#[command(name = "pixart", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start and matched once: the size of the largest variant (serve's flags) costs
// nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Generate images from a prompt or a fal request; prints fal's response JSON on stdout.
    ///
    /// Requests use fal's `fal-ai/pixart-sigma` schema (a JSON file with --request, or plain flags,
    /// which override the file's fields). PNGs go to --out-dir and their `file://` URLs into the
    /// response, or inline as data URIs with --sync-mode.
    ///
    /// Safety checker: fal's NSFW image classifier (--safety-checker, default
    /// Falconsai/nsfw_image_detection) runs on every image unless the request sets
    /// `enable_safety_checker` false; flagged images become black PNGs and `has_nsfw_concepts`
    /// says which. If it cannot be loaded, nothing starts: pass --no-safety-checker to run without
    /// it (requests are then unchecked, and asking for the check is refused).
    Generate(generate::GenerateArgs),
    /// Time each stage (tokenize, T5, every transformer step, VAE, total) and report peak memory.
    Bench(bench::BenchArgs),
    /// Serve fal's queue API locally (`fal-ai/pixart-sigma`), so fal's official clients work
    /// unmodified: submit/status/stream/result/cancel, `/run/`, storage uploads, webhooks.
    ///
    /// Prints `pixart serve: listening on http://ADDR` on stdout once the model is loaded; logs
    /// go to stderr (RUST_LOG sets the level). Ctrl-C or SIGTERM shuts down gracefully.
    Serve(serve::ServeArgs),
    /// Run jobs of a shared queue (`--queue redis://HOST:PORT`) without serving HTTP: start one
    /// per GPU (`--device cuda:N`) beside one or more `pixart serve --queue … --workers 0` fronts.
    ///
    /// Prints `pixart worker: working jobs of URL` on stdout once the model is loaded. SIGTERM
    /// lets the running job finish (--shutdown-grace) or gives it back to the queue.
    Worker(worker::WorkerArgs),
    /// Print the JSON Schema of a generation request (fal's input schema, with the ranges,
    /// choices and defaults this build applies).
    Schema(SchemaArgs),
}

/// Arguments of `pixart schema`.
#[derive(Debug, clap::Args)]
struct SchemaArgs {
    /// Print the request fields as a Markdown table (field, flag, default, allowed, what) instead.
    #[arg(long, env = "PIXART_MARKDOWN", value_parser = clap::builder::FalseyValueParser::new())]
    markdown: bool,
}

/// Prints `text` and a newline on stdout; a closed pipe (`pixart … | head`) is not an error.
pub fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Keeps freed memory for reuse instead of handing it back to the kernel (glibc only).
///
/// A generation allocates and frees the same large buffers at every step and every VAE layer
/// (tens to hundreds of MB each). By default glibc serves blocks above its mmap threshold with a
/// fresh mmap and unmaps them on free, so every such buffer is page-faulted in and zeroed by the
/// kernel again: measured on `benches/cpu_vs_diffusers.py`'s model, 40% of a transformer step and
/// a third of the VAE decode. With large blocks on the heap and no trimming, the process keeps its
/// high-water mark instead (peak RSS +5% there).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Schema(args) if args.markdown => emit(pixart_fal::fields_table().trim_end()),
        Command::Schema(_) => serde_json::to_string_pretty(&pixart_fal::input_schema())
            .map_err(anyhow::Error::from)
            .and_then(|text| emit(&text)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", pixart_pipeline::error_report(err.as_ref()));
            std::process::ExitCode::from(exit_code(&err))
        }
    }
}

/// 2 for requests and parameters that fail validation (like clap's usage errors), 1 otherwise.
fn exit_code(err: &anyhow::Error) -> u8 {
    let invalid_request = err.downcast_ref::<pixart_fal::InvalidRequest>().is_some();
    let invalid_parameter = err
        .downcast_ref::<pixart_pipeline::PipelineError>()
        .is_some_and(|e| matches!(e, pixart_pipeline::PipelineError::InvalidParameter(_)));
    if invalid_request || invalid_parameter {
        2
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag of every command can be set from a `PIXART_*` environment variable.
    #[test]
    fn every_flag_has_an_environment_variable() {
        let command = Cli::command();
        let mut checked = 0;
        for sub in command.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                let long = arg.get_long().unwrap_or_default();
                let expected = format!("PIXART_{}", long.to_ascii_uppercase().replace('-', "_"));
                assert_eq!(env.as_deref(), Some(expected.as_str()), "pixart {} --{long}", sub.get_name());
                checked += 1;
            }
        }
        assert!(checked > 40, "only {checked} flags seen");
    }

    /// The model flags are one struct: the same names, variables and defaults everywhere.
    #[test]
    fn model_flags_are_shared() {
        let command = Cli::command();
        let describe = |name: &str| -> Vec<String> {
            let sub = command.find_subcommand(name).unwrap();
            ["model", "device", "dtype", "offline", "cache_dir", "text_encoder_on_cpu", "clean_caption"]
                .iter()
                .map(|id| {
                    let arg = sub.get_arguments().find(|a| a.get_id() == id).unwrap();
                    format!("{:?} {:?} {:?}", arg.get_long(), arg.get_env(), arg.get_default_values())
                })
                .collect()
        };
        assert_eq!(describe("generate"), describe("bench"));
        assert_eq!(describe("generate"), describe("serve"));
    }
}
