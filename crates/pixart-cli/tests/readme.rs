//! The README as a new user meets it: every shell command it marks `# offline, tiny model` runs as
//! written (from a folder holding the repository's `tests/`, no network, an empty hub cache, no
//! `PIXART_*` variables) and succeeds; a server command prints that it is listening and stops
//! cleanly when signalled. And the README's request-field table is the one the field table generates.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MARK: &str = "# offline, tiny model";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).unwrap()
}

/// Lines of the README's `sh` blocks that carry the offline mark, without it.
fn offline_commands(readme: &str) -> Vec<String> {
    let mut in_sh = false;
    let mut commands = Vec::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh = line.trim() == "```sh";
            continue;
        }
        if in_sh && line.trim_end().ends_with(MARK) {
            commands.push(line.trim_end().trim_end_matches(MARK).trim().to_string());
        }
    }
    commands
}

/// Shell words: spaces separate, double quotes group (no other shell syntax is used).
fn words(command: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted) = (Vec::new(), String::new(), false);
    for c in command.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            _ => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    assert!(!quoted, "unbalanced quotes in {command:?}");
    words
}

/// The process a README command starts: `cargo run … -p pixart-cli -- ARGS` is this build's
/// `pixart ARGS`; `cargo run … --example NAME` is cargo running the example.
fn process(command: &str, cwd: &Path) -> Command {
    let words = words(command);
    assert_eq!(words[..2], ["cargo", "run"], "{command}");
    let mut process = if let Some(split) = words.iter().position(|w| w == "--") {
        assert!(words[..split].contains(&"pixart-cli".to_string()), "{command}");
        let mut p = Command::new(env!("CARGO_BIN_EXE_pixart"));
        // The one change: a free port where the README says 8000 (other tests run beside this one).
        p.args(words[split + 1..].iter().map(|w| if w == "8000" { "0" } else { w.as_str() }));
        p
    } else {
        let example = words.iter().skip_while(|w| *w != "--example").nth(1).expect("an example name");
        let mut p = Command::new(env!("CARGO"));
        let manifest = repo_root().join("Cargo.toml");
        p.args(["run", "--quiet", "--example", example.as_str(), "--manifest-path"]).arg(manifest);
        p
    };
    let home = cwd.join("home");
    process
        .current_dir(cwd)
        .env("HOME", &home)
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("HF_HOME", home.join(".cache/huggingface"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_ENDPOINT")
        // The examples' port: a free one.
        .env("PIXART_PORT", "0");
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("PIXART_") && n != "PIXART_PORT") {
        process.env_remove(name);
    }
    process
}

/// Runs a server command until it says it listens, then stops it (clean exit): `pixart serve`
/// with SIGTERM, as a service manager does; an example with SIGINT (its Ctrl-C), a moment later
/// (it installs its handler when it starts serving).
fn run_server(mut process: Command, command: &str) {
    let mut child = process.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let until = Instant::now() + Duration::from_secs(300);
    let listening = loop {
        match seen.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains("listening on") => break true,
            Ok(_) => {}
            Err(_) if child.try_wait().unwrap().is_some() || Instant::now() > until => break false,
            Err(_) => {}
        }
    };
    let signal = if command.contains("--example") {
        std::thread::sleep(Duration::from_secs(1));
        "-INT"
    } else {
        "-TERM"
    };
    let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(listening, "{command}: never listened\n{stderr}");
    assert!(status.success(), "{command}: stopped with {status}\n{stderr}");
}

#[test]
fn every_offline_readme_command_runs_offline_on_a_fresh_clone() {
    let commands = offline_commands(&readme());
    assert!(commands.len() >= 6, "only {} offline commands found: {commands:?}", commands.len());
    for command in &commands {
        let cwd = std::env::temp_dir().join(format!("pixart-readme-{}-{}", std::process::id(), commands.len()));
        let _ = std::fs::remove_dir_all(&cwd);
        std::fs::create_dir_all(&cwd).unwrap();
        std::os::unix::fs::symlink(repo_root().join("tests"), cwd.join("tests")).unwrap();
        let process = process(command, &cwd);
        if command.contains(" serve") {
            run_server(process, command);
        } else {
            let output = { process }.output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{command}: {}\n{stderr}", output.status);
            if command.contains(" generate ") {
                let pngs = std::fs::read_dir(cwd.join("out")).unwrap().count();
                assert!(pngs > 0, "{command}: no image written");
            }
        }
        eprintln!("ran: {command}");
        std::fs::remove_dir_all(&cwd).unwrap();
    }
}

#[test]
fn the_readme_holds_the_generated_field_table() {
    let output = Command::new(env!("CARGO_BIN_EXE_pixart")).args(["schema", "--markdown"]).output().unwrap();
    assert!(output.status.success());
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(
        readme().contains(table.trim()),
        "the README's request-field table is not `pixart schema --markdown`:\n{table}"
    );
}

#[test]
fn commands_are_read_as_a_shell_reads_them() {
    let w = words(r#"cargo run -- generate --prompt "a cat" --seed 1"#);
    assert_eq!(w, ["cargo", "run", "--", "generate", "--prompt", "a cat", "--seed", "1"]);
    let found = offline_commands("```sh\nx --a   # offline, tiny model\ny\n```\n```rust\nz # offline, tiny model\n```");
    assert_eq!(found, ["x --a"]);
}
