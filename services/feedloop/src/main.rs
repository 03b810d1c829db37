//! `feedloop`: the command line of the feedback pipeline (in the library: `feedloop::cli`).

/// mimalloc: the services allocate per event and per change; glibc's malloc cost a quarter of
/// the collector's CPU under load and fragmented its memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    feedloop::cli::main()
}
