//! Live one-line progress on stderr for long operations, shown only when stderr is a terminal
//! (nothing at all otherwise, so logs and pipes stay clean).
//!
//! A [`Progress`] owns a thread that redraws the line every `period` from a closure; dropping
//! it stops the thread and erases the line.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Starts redrawing `line()` (given the time since start) if stderr is a terminal;
    /// otherwise does nothing.
    pub fn start<F>(period: Duration, line: F) -> Progress
    where
        F: Fn(Duration) -> String + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        if !std::io::stderr().is_terminal() {
            return Progress { stop, thread: None };
        }
        let stop2 = Arc::clone(&stop);
        let t0 = Instant::now();
        let thread = std::thread::Builder::new()
            .name("uswap-progress".into())
            .spawn(move || {
                let width = terminal_width().saturating_sub(1).max(20);
                while !stop2.load(Ordering::Acquire) {
                    let text: String = line(t0.elapsed()).chars().take(width).collect();
                    // The line, cleared to its end, and the cursor back at its start: whatever
                    // the program prints next overwrites it rather than following it.
                    let _ = write!(std::io::stderr(), "\r{text}\x1b[K\r");
                    let wake = Instant::now() + period;
                    while Instant::now() < wake && !stop2.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                let _ = write!(std::io::stderr(), "\r\x1b[K");
            })
            .ok();
        Progress { stop, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn terminal_width() -> usize {
    match ratatui::crossterm::terminal::size() {
        Ok((w, _)) if w > 0 => w as usize,
        _ => 80,
    }
}
