//! The web server's side of the tests: [`Web`], the port a test daemon serves on, and plain
//! HTTP/1.1, one request per connection, with no client library between the test and what the
//! server says.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::daemon::{last_lines, Peer, TestDaemon, WAIT};

/// The clients' side of the daemon's web server: a port of 127.0.0.1 bound before the daemon
/// starts (so no other test can take it first), which the daemon serves on.
pub struct Web {
    listener: std::net::TcpListener,
}

impl Web {
    /// The server's base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listener.local_addr().unwrap())
    }
}

impl Peer for Web {
    async fn start() -> Web {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        Web { listener }
    }

    fn listener(&self) -> Option<std::net::TcpListener> {
        Some(self.listener.try_clone().unwrap())
    }

    /// Until `/health` answers 200: the model is loaded.
    async fn connected(&self, daemon: &TestDaemon) {
        let url = self.url();
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            if let Ok((200, _, _)) = http(&url, "GET /health", &[], "").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the web server did not become healthy within {WAIT:?}; the last log lines:\n{}",
            last_lines(&daemon.logs(), 40)
        );
    }
}

/// One HTTP/1.1 request over a fresh connection: status, headers (lower-case names) and body.
pub async fn http(
    base: &str,
    line: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, Vec<(String, String)>, String)> {
    let host = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    let mut request = format!(
        "{line} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("no answer in 60 s"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers, body.to_string()))
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A port of 127.0.0.1 held bound but not listening: a connection to it is refused, no other
/// test can take it, and a server that binds with `SO_REUSEADDR` (as tokio's listener does) can
/// still listen on it. Holding it until the server is up closes the race of a port picked free
/// and bound later.
pub fn reserved_port() -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket
}
