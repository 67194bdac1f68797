//! The `spool` command: parses arguments once, runs one command, and turns its outcome into an
//! exit code (0 ok, 1 failure or a verify that found problems, 2 bad usage or bad input).

mod cli;

/// The replay projects on one thread and frees on another; glibc's malloc serialises that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
