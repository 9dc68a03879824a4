//! The opt-in `GET /metrics` endpoint of `uswap daemon --metrics ADDR` (see [`super::prometheus`]
//! for the format).
//!
//! `ADDR` is `HOST:PORT` or `unix:/path`. A TCP address must be a loopback one unless the
//! caller explicitly allows others (`--metrics-allow-remote`): the figures name every managed
//! program, and the endpoint has no authentication. HTTP parsing is `tiny_http`'s; every scrape
//! asks the monitor for fresh reports.
//!
//! Owns: the endpoint's socket and thread. Must not: block the monitor (a scrape takes the same
//! short per-client locks `uswap status` takes).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::monitor::ClientReport;

/// Where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics address {0:?}: expected HOST:PORT (e.g. 127.0.0.1:9464) or unix:/path")]
    BadAddress(String),
    #[error("metrics address {0} is not a loopback address: the endpoint has no authentication; pass --metrics-allow-remote to serve it there anyway")]
    NotLoopback(SocketAddr),
    #[error("listening for metrics on {addr}")]
    Bind {
        addr: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl MetricsAddr {
    /// Parses `HOST:PORT` or `unix:/path`; a non-loopback TCP address is refused unless
    /// `allow_remote`.
    pub fn parse(text: &str, allow_remote: bool) -> Result<MetricsAddr, MetricsError> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(MetricsError::BadAddress(text.into()));
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(path)));
        }
        let addr = text
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| MetricsError::BadAddress(text.into()))?;
        if !addr.ip().is_loopback() && !allow_remote {
            return Err(MetricsError::NotLoopback(addr));
        }
        Ok(MetricsAddr::Tcp(addr))
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "http://{a}/metrics"),
            MetricsAddr::Unix(p) => write!(f, "unix:{} (GET /metrics)", p.display()),
        }
    }
}

/// A running endpoint; dropping it stops the thread (and removes a Unix socket file).
pub struct MetricsServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What a scrape reads: the monitor's current reports.
pub type ReportSource = Arc<dyn Fn() -> Vec<ClientReport> + Send + Sync>;

/// Binds `addr` and serves `GET /metrics` from `source` on a thread of its own.
pub fn serve(addr: &MetricsAddr, source: ReportSource) -> Result<MetricsServer, MetricsError> {
    let bind_err = |e| MetricsError::Bind {
        addr: addr.to_string(),
        source: e,
    };
    let (server, unix_path) = match addr {
        MetricsAddr::Tcp(a) => (tiny_http::Server::http(a).map_err(bind_err)?, None),
        MetricsAddr::Unix(p) => {
            // A stale socket file from an earlier run would make bind fail.
            if std::os::unix::net::UnixStream::connect(p).is_err() {
                let _ = std::fs::remove_file(p);
            }
            let server = tiny_http::Server::http_unix(p).map_err(bind_err)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o660))
                .map_err(|e| bind_err(Box::new(e)))?;
            (server, Some(p.clone()))
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("uswap-metrics".into())
        .spawn(move || {
            while !stop2.load(Ordering::Acquire) {
                match server.recv_timeout(Duration::from_millis(200)) {
                    Ok(Some(req)) => answer(req, &source),
                    Ok(None) => {}
                    Err(e) => tracing::debug!("metrics endpoint: {e}"),
                }
            }
        })
        .map_err(|e| bind_err(Box::new(e)))?;
    Ok(MetricsServer {
        stop,
        thread: Some(thread),
        unix_path,
    })
}

fn answer(req: tiny_http::Request, source: &ReportSource) {
    let path = req.url().split('?').next().unwrap_or("");
    let header = |v: &str| {
        tiny_http::Header::from_bytes(&b"Content-Type"[..], v.as_bytes())
            .expect("a valid constant header")
    };
    let resp = if *req.method() != tiny_http::Method::Get {
        tiny_http::Response::from_string("only GET\n").with_status_code(405)
    } else if path == "/metrics" {
        let body = super::prometheus::render(&source());
        tiny_http::Response::from_string(body).with_header(header(super::prometheus::CONTENT_TYPE))
    } else if path == "/" {
        tiny_http::Response::from_string("uswap daemon: metrics at /metrics\n")
    } else {
        tiny_http::Response::from_string("not found: try /metrics\n").with_status_code(404)
    };
    if let Err(e) = req.respond(resp) {
        tracing::debug!("metrics endpoint: answering: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_refuses_a_public_address_unless_allowed() {
        assert!(matches!(
            MetricsAddr::parse("0.0.0.0:9464", false),
            Err(MetricsError::NotLoopback(_))
        ));
        assert!(MetricsAddr::parse("0.0.0.0:9464", true).is_ok());
        assert_eq!(
            MetricsAddr::parse("127.0.0.1:9464", false).unwrap(),
            MetricsAddr::Tcp("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(
            MetricsAddr::parse("unix:/run/uswap/metrics.sock", false).unwrap(),
            MetricsAddr::Unix("/run/uswap/metrics.sock".into())
        );
        assert!(matches!(
            MetricsAddr::parse("unix:", false),
            Err(MetricsError::BadAddress(_))
        ));
        assert!(matches!(
            MetricsAddr::parse("9464", false),
            Err(MetricsError::BadAddress(_))
        ));
    }
}
