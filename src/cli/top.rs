//! `uswap top`: a live view of every program a daemon manages, refreshed every second (q or
//! Esc quits), or with `--once` one frame as plain text on stdout (for scripts and tests).
//!
//! The figures are those of `uswap status --json` (the daemon's status query); the fault rate
//! is the daemon's own (faults served over its last full second), so a single query is enough.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::UsageError;
use crate::monitor::{query_status, ClientReport};

#[derive(Args, Debug)]
pub struct TopArgs {
    /// The daemon's socket [default: $XDG_RUNTIME_DIR/uswap.sock or /run/uswap/uswap.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Print one frame as text and exit.
    #[arg(long)]
    pub once: bool,
    /// Also show programs that have exited (their last figures).
    #[arg(long)]
    pub all: bool,
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
}

/// Column titles; `rows` fills them in this order.
pub const HEADERS: [&str; 11] = [
    "ID",
    "PID",
    "NAME",
    "RSS MiB",
    "BUDGET",
    "STORE MiB",
    "RATIO",
    "FAULTS/s",
    "P99 us",
    "FAULTS",
    "STATE",
];

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 20) as f64)
}

/// One row of text per report.
pub fn rows(reports: &[ClientReport]) -> Vec<[String; 11]> {
    reports
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                r.pid.to_string(),
                r.name.chars().take(20).collect(),
                mib(r.rss_anon_bytes),
                r.budget_bytes.map_or("none".into(), mib),
                mib(r.store.bytes_out),
                format!("{:.2}", r.compression_ratio),
                format!("{:.0}", r.fault_rate_per_s),
                format!("{:.1}", r.fault_latency.p99_us),
                r.faults.to_string(),
                if r.alive { "live" } else { "exited" }.into(),
            ]
        })
        .collect()
}

fn fetch(path: &std::path::Path, all: bool) -> anyhow::Result<Vec<ClientReport>> {
    let values = query_status(path).with_context(|| {
        format!(
            "no daemon answers on {} (start one with `uswap daemon`)",
            path.display()
        )
    })?;
    let mut reports: Vec<ClientReport> = values
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<_, _>>()
        .context("decoding the daemon's status")?;
    reports.retain(|r| all || r.alive);
    Ok(reports)
}

fn title(path: &std::path::Path, reports: &[ClientReport]) -> String {
    let live = reports.iter().filter(|r| r.alive).count();
    let rss: u64 = reports
        .iter()
        .filter(|r| r.alive)
        .map(|r| r.rss_anon_bytes)
        .sum();
    let store: u64 = reports
        .iter()
        .filter(|r| r.alive)
        .map(|r| r.store.bytes_out)
        .sum();
    format!(
        "uswap top — {} — {live} program(s) attached, RSS {} MiB, store {} MiB",
        path.display(),
        mib(rss),
        mib(store)
    )
}

/// Plain-text frame: the title, then aligned columns.
pub fn text_frame(path: &std::path::Path, reports: &[ClientReport]) -> String {
    let rows = rows(reports);
    let mut width: Vec<usize> = HEADERS.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let parts: Vec<String> = cells
            .iter()
            .zip(&width)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 2 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        parts.join("  ").trim_end().to_string()
    };
    let mut out = title(path, reports);
    out.push('\n');
    out.push_str(&line(&HEADERS.map(String::from)));
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no programs attached)\n");
    }
    out
}

pub fn top(args: TopArgs) -> anyhow::Result<()> {
    let path = args
        .socket
        .clone()
        .unwrap_or_else(crate::protocol::default_socket_path);
    if args.once {
        print!("{}", text_frame(&path, &fetch(&path, args.all)?));
        return Ok(());
    }
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return Err(UsageError(
            "top: stdout is not a terminal (use --once for one frame as text)".into(),
        )
        .into());
    }
    // Fail before taking over the screen if nobody answers.
    let mut reports = fetch(&path, args.all)?;
    let mut terminal = ratatui::init();
    let result = interactive(&mut terminal, &path, &args, &mut reports);
    ratatui::restore();
    result
}

fn interactive(
    terminal: &mut ratatui::DefaultTerminal,
    path: &std::path::Path,
    args: &TopArgs,
    reports: &mut Vec<ClientReport>,
) -> anyhow::Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Modifier, Style};
    use ratatui::widgets::{Block, Paragraph, Row, Table};

    let interval = Duration::from_millis(args.interval_ms.max(100));
    let mut error: Option<String> = None;
    loop {
        terminal
            .draw(|f| {
                let [head, body, foot] = Layout::vertical([
                    Constraint::Length(1),
                    Constraint::Min(3),
                    Constraint::Length(1),
                ])
                .areas(f.area());
                f.render_widget(Paragraph::new(title(path, reports)), head);
                let widths = [
                    Constraint::Length(5),
                    Constraint::Length(8),
                    Constraint::Min(12),
                    Constraint::Length(9),
                    Constraint::Length(8),
                    Constraint::Length(9),
                    Constraint::Length(6),
                    Constraint::Length(9),
                    Constraint::Length(9),
                    Constraint::Length(10),
                    Constraint::Length(7),
                ];
                let table = Table::new(rows(reports).into_iter().map(Row::new), widths)
                    .header(Row::new(HEADERS).style(Style::new().add_modifier(Modifier::BOLD)))
                    .block(Block::bordered());
                f.render_widget(table, body);
                let footer = match &error {
                    Some(e) => format!("daemon: {e}"),
                    None => "q: quit".into(),
                };
                f.render_widget(Paragraph::new(footer), foot);
            })
            .context("drawing")?;
        if event::poll(interval).context("reading the terminal")? {
            if let Event::Key(k) = event::read().context("reading the terminal")? {
                let ctrl_c =
                    k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                if k.kind == KeyEventKind::Press
                    && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
                {
                    return Ok(());
                }
            }
            continue;
        }
        match fetch(path, args.all) {
            Ok(r) => {
                *reports = r;
                error = None;
            }
            Err(e) => error = Some(format!("{e:#}")),
        }
    }
}
