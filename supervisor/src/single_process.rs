//! `gptossd generate` and `gptossd bench` without `--stages`: the whole model in one process,
//! which is the stage worker binary's (`gptossd-stage generate`, `gptossd-stage bench`), so
//! that this binary links no kernels. It is found the way the pipeline finds its workers
//! ([`crate::launch::stage_binary`]).
//!
//! The generator is started with the prompt already rendered and tokenized, the sampling
//! validated and its seed bound, and read line by line
//! (`gptossd_shared::generation::GenerateLine`); its error, the last `gptossd-stage: error:`
//! line on its stderr, becomes this command's. The bench replaces this process (`exec`): its
//! output, errors and exit status are the command's.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context};
use gptossd_shared::device::Device;
use gptossd_shared::generation::{Finish, GenerateLine};
use gptossd_shared::sampling::SamplingSpec;

use crate::launch::stage_binary;

/// How the stage worker binary prefixes the error it exits with.
const ERROR_PREFIX: &str = "gptossd-stage: error: ";

/// Prompt ids per `--prompt-tokens` argument: one argument may hold at most 128 KiB on Linux.
const IDS_PER_ARG: usize = 4096;

/// The stage worker binary with its subcommand `sub`.
pub(crate) fn stage_command(sub: &str) -> anyhow::Result<Command> {
    let mut cmd = Command::new(stage_binary()?);
    cmd.arg(sub);
    Ok(cmd)
}

/// Replaces this process with `cmd`; returns only if that failed.
pub(crate) fn exec(mut cmd: Command) -> anyhow::Error {
    let program = cmd.get_program().to_string_lossy().into_owned();
    anyhow!(cmd.exec()).context(format!("starting {program}"))
}

/// One generation in the stage worker binary.
pub struct Generate<'a> {
    pub model: &'a Path,
    pub prompt: &'a [u32],
    pub max_tokens: usize,
    /// Validated, its seed bound.
    pub sampling: SamplingSpec,
    pub stop_tokens: &'a [u32],
    pub threads: usize,
    pub device: &'a Device,
}

/// Runs `req` in a `gptossd-stage generate` process; `on_token` sees each token as it comes.
/// Returns the generated tokens and how the generation ended.
pub fn generate(
    req: &Generate<'_>,
    mut on_token: impl FnMut(u32),
) -> anyhow::Result<(Vec<u32>, Finish)> {
    let mut cmd = stage_command("generate")?;
    let p = req.sampling.params();
    cmd.arg("--model")
        .arg(req.model)
        .args(["--max-tokens", &req.max_tokens.to_string()])
        .args(["--temperature", &p.temperature.to_string()])
        .args(["--top-p", &p.top_p.to_string()])
        .args(["--seed", &req.sampling.seed().to_string()])
        .args(["--threads", &req.threads.to_string()])
        .args(["--device", &req.device.to_string()]);
    if let Some(k) = p.top_k {
        cmd.args(["--top-k", &k.to_string()]);
    }
    for chunk in req.prompt.chunks(IDS_PER_ARG) {
        cmd.args(["--prompt-tokens", &join(chunk)]);
    }
    if !req.stop_tokens.is_empty() {
        cmd.args(["--stop-tokens", &join(req.stop_tokens)]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl, an
    // async-signal-safe system call, on plain integers.
    unsafe {
        cmd.pre_exec(|| {
            // The generator dies with this process (as pipeline workers do).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    let stderr = child.stderr.take().context("the generator's stderr")?;
    let errors = std::thread::spawn(move || forward_stderr(stderr));
    let stdout = child.stdout.take().context("the generator's stdout")?;

    let mut tokens = Vec::new();
    let mut finish = None;
    let mut unreadable = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<GenerateLine>(&line) {
            Ok(GenerateLine::Token { token }) => {
                on_token(token);
                tokens.push(token);
            }
            Ok(GenerateLine::End { finish_reason }) => finish = Some(finish_reason),
            Err(_) => {
                unreadable.get_or_insert(line);
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {program}"))?;
    let error = errors.join().ok().flatten();
    match (finish, error) {
        (Some(finish), _) if status.success() => Ok((tokens, finish)),
        (_, Some(error)) => bail!("{error}"),
        _ => match unreadable {
            Some(line) => bail!("{program} generate wrote an unreadable line: {line:?}"),
            None => bail!("{program} generate ended without a finish reason ({status})"),
        },
    }
}

/// Copies the generator's stderr to ours as it comes, except its closing error line, which is
/// returned (without its prefix).
fn forward_stderr(stderr: impl std::io::Read) -> Option<String> {
    let mut error = None;
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        match line.strip_prefix(ERROR_PREFIX) {
            Some(message) => error = Some(message.to_owned()),
            None => eprintln!("{line}"),
        }
    }
    error
}

fn join(ids: &[u32]) -> String {
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    ids.join(",")
}
