//! `gptossd`: the daemon and its command-line tools. The commands live in the library
//! (`gptossd::cli`), which is private beyond them and the chat format.

fn main() -> std::process::ExitCode {
    gptossd::cli::main()
}
