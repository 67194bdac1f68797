//! The `spool` command: parses arguments once, runs one command, and turns its outcome into an
//! exit code (0 ok, 1 failure or a verify that found problems, 2 bad usage or bad input).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
