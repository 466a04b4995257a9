//! Measuring helpers the benchmark runs inside the testbed's laptop (`cargo xtask bench-tool`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Helpers run inside the laptop by the benchmark (hidden from `--help`).
#[derive(clap::Subcommand, Debug)]
pub enum Tool {
    /// Accept and close connections on ADDR
    Listen { addr: SocketAddr },
    /// Open and close N connections to ADDR from T threads; print connections per second and
    /// this process's CPU time per connection (µs)
    ConnectRate {
        addr: SocketAddr,
        n: usize,
        threads: usize,
    },
    /// Open N idle connections to ADDR, print "ready", hold them until stdin closes
    Hold { addr: SocketAddr, n: usize },
    /// Send MIB MiB of zeros to ADDR, half-close, wait for the other end to close (everything
    /// delivered); print MiB/s
    Send { addr: SocketAddr, mib: usize },
    /// Read MIB MiB from ADDR, then close; print MiB/s
    Receive { addr: SocketAddr, mib: usize },
    /// GET PATH from the HTTP server at ADDR, one request at a time on one keep-alive
    /// connection, for SECS seconds; print the p50 in µs (nanosecond clock: wrk's percentiles
    /// have 1 µs steps) and the number of requests
    Latency {
        addr: SocketAddr,
        path: String,
        secs: f64,
    },
    /// GET PATH from the HTTP server at ADDR again and again on one keep-alive connection for
    /// SECS seconds (the response under way then is finished); print the bodies' MiB/s and
    /// bytes. A time-bounded run, unlike one download of a fixed size: its figure does not
    /// depend on what else the machine did during a fraction of a second
    Throughput {
        addr: SocketAddr,
        path: String,
        secs: f64,
    },
}

pub fn run(t: Tool) -> Result<()> {
    match t {
        Tool::Listen { addr } => {
            // A deep backlog: SYNs dropped on a full queue wait a second to retry, which would
            // measure the listener instead of connect().
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(4096)?;
            let l: TcpListener = s.into();
            println!("listening");
            std::io::stdout().flush()?;
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let l = l.try_clone().expect("listener clone");
                    std::thread::spawn(move || {
                        for c in l.incoming() {
                            drop(c);
                        }
                    })
                })
                .collect();
            for t in threads {
                let _ = t.join();
            }
        }
        Tool::ConnectRate { addr, n, threads } => {
            let start = Instant::now();
            let per = n / threads;
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    std::thread::spawn(move || {
                        for _ in 0..per {
                            // Close with RST: no TIME_WAIT, so the port range never runs out.
                            if let Ok(s) = TcpStream::connect(addr) {
                                let off = libc::linger {
                                    l_onoff: 1,
                                    l_linger: 0,
                                };
                                // SAFETY: setsockopt on our own socket with a valid struct.
                                unsafe {
                                    libc::setsockopt(
                                        std::os::fd::AsRawFd::as_raw_fd(&s),
                                        libc::SOL_SOCKET,
                                        libc::SO_LINGER,
                                        (&off as *const libc::linger).cast(),
                                        std::mem::size_of::<libc::linger>() as u32,
                                    )
                                };
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                let _ = h.join();
            }
            let n = (per * threads) as f64;
            println!(
                "{:.1} {:.3}",
                n / start.elapsed().as_secs_f64(),
                cpu_seconds() * 1e6 / n
            );
        }
        Tool::Hold { addr, n } => {
            let mut conns = Vec::with_capacity(n);
            for _ in 0..n {
                conns.push(TcpStream::connect(addr)?);
            }
            println!("ready");
            std::io::stdout().flush()?;
            let mut buf = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut buf);
        }
        Tool::Send { addr, mib } => {
            let mut s = TcpStream::connect(addr)?;
            let buf = vec![0u8; CHUNK];
            let start = Instant::now();
            for _ in 0..mib * (1 << 20) / CHUNK {
                s.write_all(&buf)?;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            // The far end closes once it has read everything.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)?;
            println!("{:.1}", mib as f64 / start.elapsed().as_secs_f64());
        }
        Tool::Receive { addr, mib } => {
            let mut s = TcpStream::connect(addr)?;
            let mut buf = vec![0u8; CHUNK];
            let start = Instant::now();
            let mut left = mib * (1 << 20);
            while left > 0 {
                let n = s.read(&mut buf[..left.min(CHUNK)])?;
                if n == 0 {
                    anyhow::bail!("{addr} closed with {left} bytes still to come");
                }
                left -= n;
            }
            println!("{:.1}", mib as f64 / start.elapsed().as_secs_f64());
        }
        Tool::Latency { addr, path, secs } => {
            let mut times = latencies(addr, &path, Duration::from_secs_f64(secs))?;
            anyhow::ensure!(!times.is_empty(), "no request completed");
            times.sort_unstable();
            let p50 = times[times.len() / 2];
            println!("{:.3} {}", p50.as_nanos() as f64 / 1e3, times.len());
        }
        Tool::Throughput { addr, path, secs } => {
            let (bytes, took) = throughput(addr, &path, Duration::from_secs_f64(secs))?;
            anyhow::ensure!(bytes > 0, "no body byte came");
            println!(
                "{:.1} {bytes}",
                bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
            );
        }
    }
    Ok(())
}

/// The time of each request for `path` on one keep-alive connection to `addr` during `run`.
fn latencies(addr: SocketAddr, path: &str, run: Duration) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(1 << 16);
    requests(addr, path, run, |took, _| times.push(took))?;
    Ok(times)
}

/// The body bytes received for `path`, requested again and again on one keep-alive connection
/// to `addr` during `run`, and the time they took (from the first request to the last byte).
fn throughput(addr: SocketAddr, path: &str, run: Duration) -> Result<(u64, Duration)> {
    let mut bytes = 0;
    let start = Instant::now();
    requests(addr, path, run, |_, body| bytes += body as u64)?;
    Ok((bytes, start.elapsed()))
}

/// GETs `path` one request at a time on one keep-alive connection to `addr` until `run` has
/// passed, and gives `done` each response's time (from sending the request to its body's last
/// byte) and body length.
fn requests(
    addr: SocketAddr,
    path: &str,
    run: Duration,
    mut done: impl FnMut(Duration, usize),
) -> Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut buf = vec![0u8; BUF];
    let start = Instant::now();
    while start.elapsed() < run {
        let sent = Instant::now();
        s.write_all(request.as_bytes())?;
        let mut have = 0;
        let (head, len) = loop {
            if have == buf.len() {
                anyhow::bail!("a response head longer than {} bytes", buf.len());
            }
            let n = s.read(&mut buf[have..])?;
            if n == 0 {
                anyhow::bail!("{addr} closed the connection");
            }
            have += n;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = r.parse(&buf[..have])? {
                anyhow::ensure!(r.code == Some(200), "{path}: status {:?}", r.code);
                let len: usize = r
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                    .context("a response without Content-Length")?;
                break (head, len);
            }
        };
        let end = head + len;
        while have < end {
            let n = s.read(&mut buf[..(end - have).min(BUF)])?;
            if n == 0 {
                anyhow::bail!("{addr} closed the connection mid-body");
            }
            have += n;
        }
        done(sent.elapsed(), len);
    }
    Ok(())
}

/// The request helpers' buffer: a response head must fit; a body is read in pieces of this.
const BUF: usize = 256 << 10;

/// The send and receive helpers' buffer.
const CHUNK: usize = 1 << 20;

/// User and system CPU time of this process so far (all its threads), in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on loopback that answers each request on its one connection with `response`,
    /// `times` times, and closes when the next one has come (read: a clean close, no reset).
    fn server(response: &'static [u8], times: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            for answered in 0.. {
                let mut have = 0;
                while !buf[..have].windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = c.read(&mut buf[have..]).unwrap();
                    if n == 0 {
                        return;
                    }
                    have += n;
                }
                if answered == times {
                    return;
                }
                // In two writes: the body is read past the first piece.
                let (head, body) = response.split_at(response.len() - 3);
                c.write_all(head).unwrap();
                c.flush().unwrap();
                std::thread::sleep(Duration::from_millis(1));
                c.write_all(body).unwrap();
            }
        });
        addr
    }

    #[test]
    fn each_request_is_timed_until_its_whole_body_is_in() {
        let addr = server(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 1000);
        let times = latencies(addr, "/1k", Duration::from_millis(50)).unwrap();
        assert!(!times.is_empty());
        // Every response's last bytes come 1 ms after its head.
        assert!(
            times.iter().all(|t| *t >= Duration::from_millis(1)),
            "{times:?}"
        );
    }

    #[test]
    fn throughput_counts_the_bodies_and_nothing_else() {
        let addr = server(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            usize::MAX,
        );
        let (bytes, took) = throughput(addr, "/bulk", Duration::from_millis(50)).unwrap();
        assert!(took >= Duration::from_millis(50), "{took:?}");
        // Whole bodies of 5 bytes, at most one a millisecond (the server pauses in each).
        assert!(bytes > 0 && bytes % 5 == 0, "{bytes}");
        let most = 5 * (took.as_millis() as u64 + 1);
        assert!(bytes <= most, "{bytes} bytes in {took:?}: more than bodies");
    }

    #[test]
    fn a_response_it_cannot_time_is_an_error() {
        let no_length = server(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\nhello", 1);
        let e = latencies(no_length, "/", Duration::from_secs(1)).unwrap_err();
        assert!(format!("{e:#}").contains("without Content-Length"), "{e:#}");
        let not_found = server(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nno!", 1);
        let e = latencies(not_found, "/x", Duration::from_secs(1)).unwrap_err();
        assert!(format!("{e:#}").contains("status Some(404)"), "{e:#}");
        let closes = server(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 1);
        let e = latencies(closes, "/", Duration::from_secs(1)).unwrap_err();
        assert!(format!("{e:#}").contains("closed the connection"), "{e:#}");
    }
}
