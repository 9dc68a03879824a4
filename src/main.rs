//! The `uswap` binary: parse, dispatch, exit (see `uswap::cli`).
fn main() {
    std::process::exit(uswap::cli::run_main());
}
