//! What both binaries do the same way on the terminal: logging set-up and error reports.

use std::io::IsTerminal;

/// Logs to stderr, filtered by `RUST_LOG` (else `default_filter`), with ANSI colours only when
/// stderr is a terminal (redirected logs, journald and CI stay plain text).
pub fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// An error and its causes on one line, `outer: inner: innermost`, each cause said once: a
/// cause whose text the line already holds (many errors print their source in their own
/// message) is skipped.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("{0}")]
        Io(#[from] std::io::Error),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("reading /x: {0}")]
    struct Outer(#[source] Inner);

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = Outer(Inner::Io(io));
        assert_eq!(error_chain(&e), "reading /x: No such file");
        #[derive(Debug, thiserror::Error)]
        #[error("fetching f")]
        struct Top(#[source] Outer);
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        assert_eq!(
            error_chain(&Top(Outer(Inner::Io(io)))),
            "fetching f: reading /x: No such file"
        );
    }
}
