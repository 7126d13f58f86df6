//! `gptossd`: the daemon and its command-line tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gptossd_shared::testmodel::{write_test_model, Preset};

#[derive(Parser)]
#[command(name = "gptossd", version, about = "Local inference daemon for OpenAI's GPT-OSS models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a random checkpoint in the Hugging Face format of openai/gpt-oss-20b.
    MakeTestModel {
        /// tiny, bench or 20b-shape
        #[arg(long, default_value = "tiny")]
        preset: Preset,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gptossd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::MakeTestModel { preset, seed, out } => {
            let bytes = write_test_model(preset, seed, &out)
                .with_context(|| format!("writing the test model to {}", out.display()))?;
            eprintln!("wrote {bytes} bytes of weights to {}", out.display());
            Ok(())
        }
    }
}
