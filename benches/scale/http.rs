//! A minimal HTTP/1.1 keep-alive client (one scraper; no decompression, the bytes are what is measured)
//! and latency statistics.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub(super) struct Http {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
    buf: Vec<u8>,
    len: usize,
}

impl Http {
    pub(super) fn new(addr: &str) -> Http {
        Http {
            addr: addr.to_string(),
            conn: None,
            buf: Vec::new(),
            len: 0,
        }
    }

    pub(super) fn body(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// GET `path`; the body is left in [`Http::body`]. Retries once on a fresh connection.
    pub(super) fn get(&mut self, path: &str, gzip: bool) -> std::io::Result<u16> {
        match self.try_get(path, gzip) {
            Ok(s) => Ok(s),
            Err(_) => {
                self.conn = None;
                let r = self.try_get(path, gzip);
                if r.is_err() {
                    self.conn = None;
                }
                r
            }
        }
    }

    fn try_get(&mut self, path: &str, gzip: bool) -> std::io::Result<u16> {
        use std::io::{Error, ErrorKind};
        if self.conn.is_none() {
            let addr: SocketAddr = self
                .addr
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "no address"))?;
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            self.conn = Some(BufReader::with_capacity(64 * 1024, s));
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(Error::new(ErrorKind::NotConnected, "no connection"));
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: elb-exporter-bench\r\nAccept: */*\r\n{}\r\n",
            self.addr,
            if gzip {
                "Accept-Encoding: gzip\r\n"
            } else {
                ""
            }
        );
        conn.get_mut().write_all(req.as_bytes())?;
        let (status, length, chunked, mut close) = read_head(conn)?;
        self.len = 0;
        if chunked {
            read_chunked(conn, &mut self.buf, &mut self.len)?;
        } else if let Some(n) = length {
            ensure(&mut self.buf, n);
            conn.read_exact(&mut self.buf[..n])?;
            self.len = n;
        } else {
            let mut v = Vec::new();
            conn.read_to_end(&mut v)?;
            self.len = v.len();
            self.buf = v;
            close = true;
        }
        if close {
            self.conn = None;
        }
        Ok(status)
    }
}

/// The status line and headers of a response: (status, Content-Length, chunked, Connection: close).
fn read_head(conn: &mut BufReader<TcpStream>) -> std::io::Result<(u16, Option<usize>, bool, bool)> {
    use std::io::{Error, ErrorKind};
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(Error::new(ErrorKind::UnexpectedEof, "connection closed"));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, format!("status line {line:?}")))?;
    let (mut length, mut chunked, mut close) = (None::<usize>, false, false);
    for _ in 0..200 {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err(Error::new(ErrorKind::UnexpectedEof, "in headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = v.parse().ok(),
                "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                "connection" => close = v.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
    }
    Ok((status, length, chunked, close))
}

/// A chunked body, appended to `buf[..len]` (trailers skipped).
fn read_chunked(
    conn: &mut BufReader<TcpStream>,
    buf: &mut Vec<u8>,
    len: &mut usize,
) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let mut line = String::new();
    for _ in 0..1_000_000 {
        line.clear();
        conn.read_line(&mut line)?;
        let hex = line.trim().split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(hex, 16)
            .map_err(|_| Error::new(ErrorKind::InvalidData, "chunk size"))?;
        if size == 0 {
            for _ in 0..100 {
                line.clear();
                if conn.read_line(&mut line)? == 0 || line.trim().is_empty() {
                    break;
                }
            }
            break;
        }
        ensure(buf, *len + size);
        conn.read_exact(&mut buf[*len..*len + size])?;
        *len += size;
        line.clear();
        conn.read_line(&mut line)?;
    }
    Ok(())
}

fn ensure(buf: &mut Vec<u8>, n: usize) {
    if buf.len() < n {
        buf.resize(n, 0);
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Lat {
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) n: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// One scraper: sequential GETs on one keep-alive connection, `max_n` or `max_time`, after 3 warm-ups.
pub(super) fn sequential(
    addr: &str,
    path: &str,
    gzip: bool,
    max_n: usize,
    max_time: Duration,
) -> Option<Lat> {
    let mut http = Http::new(addr);
    for _ in 0..3 {
        http.get(path, gzip).ok()?;
    }
    let mut samples = Vec::with_capacity(max_n);
    let deadline = Instant::now() + max_time;
    while samples.len() < max_n && Instant::now() < deadline {
        let t = Instant::now();
        let status = http.get(path, gzip).ok()?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
        if status != 200 {
            eprintln!("    GET {addr}{path}: HTTP {status}");
            return None;
        }
    }
    samples.sort_by(f64::total_cmp);
    Some(Lat {
        p50_ms: percentile(&samples, 0.5),
        p99_ms: percentile(&samples, 0.99),
        n: samples.len(),
    })
}
