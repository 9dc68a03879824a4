//! The `uswap` command line: argument parsing (clap) and the commands. `main` only
//! parses, dispatches and turns the outcome into an exit code ([`run_main`]).
//!
//! Messages for the user go to stdout/stderr through `println!`/`eprintln!` here; diagnostics go
//! through `tracing` (`USWAP_LOG=debug` to see them). Owns: user interaction. Must not: touch
//! page state.

mod doctor;
mod plot;
mod privilege;
mod progress;
mod run;
mod status;
mod top;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "uswap",
    version,
    about = "Transparent userspace swap: cold memory of unmodified programs, compressed in a monitor"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run a program under uswap (an embedded monitor is started unless a daemon answers).
    Run(run::RunArgs),
    /// Run the long-lived monitor for many programs.
    Daemon(run::DaemonArgs),
    /// Show live per-program figures from a daemon.
    Status {
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Print the daemon's own figures (every store's mapped bytes, clients attached,
        /// fork snapshots not yet claimed) as JSON, instead of its programs.
        #[arg(long)]
        daemon: bool,
    },
    /// A live view of every program a daemon manages (q quits; --once prints one frame).
    Top(top::TopArgs),
    /// Draw a PNG of a trace written with --trace (memory, store size, fault rate over time).
    Plot(plot::PlotArgs),
    /// Check this machine for what uswap needs, and say what to change.
    Doctor {
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

/// Exit codes, decided here only.
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_FAILURE: i32 = 1;

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("USWAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn default_config_dir() -> Option<PathBuf> {
    let etc = PathBuf::from("/etc/uswap");
    if etc.is_dir() {
        return Some(etc);
    }
    let local = PathBuf::from("config");
    local.is_dir().then_some(local)
}

/// Runs the command line; returns the process exit code.
pub fn run_main() -> i32 {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(args) => {
            init_logging("warn");
            run::run(args)
        }
        Cmd::Daemon(args) => {
            init_logging("info");
            run::daemon(args).map(|_| 0)
        }
        Cmd::Status {
            socket,
            json,
            daemon,
        } => status::status(socket, json, daemon).map(|_| 0),
        Cmd::Top(args) => top::top(args).map(|_| 0),
        Cmd::Plot(args) => {
            init_logging("warn");
            plot::plot(args).map(|_| 0)
        }
        Cmd::Doctor { socket } => doctor::doctor(socket),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("uswap: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            }
        }
    }
}

/// A bad argument or config file: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);
