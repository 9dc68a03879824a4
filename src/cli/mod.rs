//! The `uswap` command line: argument parsing (clap) and the four commands. `main` only
//! parses, dispatches and turns the outcome into an exit code ([`run_main`]).
//!
//! Messages for the user go to stdout/stderr through `println!`/`eprintln!` here; diagnostics go
//! through `tracing` (`USWAP_LOG=debug` to see them). Owns: user interaction. Must not: touch
//! page state.

mod doctor;
mod privilege;
mod run;
mod status;

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
    Daemon {
        /// Socket to listen on [default: $XDG_RUNTIME_DIR/uswap.sock or /run/uswap/uswap.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Directory of per-program config files [default: /etc/uswap if it exists, else ./config].
        #[arg(long)]
        config_dir: Option<PathBuf>,
        /// Socket file mode, octal (0600: only this user's programs; 0660: also the group's)
        /// [default: daemon config `socket_mode`, 600].
        #[arg(long)]
        mode: Option<String>,
        /// The daemon's own config [default: daemon.toml in the config directory, if any].
        #[arg(long)]
        daemon_config: Option<PathBuf>,
    },
    /// Show live per-program figures from a daemon.
    Status {
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
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
        Cmd::Daemon {
            socket,
            config_dir,
            mode,
            daemon_config,
        } => {
            init_logging("info");
            run::daemon(socket, config_dir, mode.as_deref(), daemon_config).map(|_| 0)
        }
        Cmd::Status { socket, json } => status::status(socket, json).map(|_| 0),
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
