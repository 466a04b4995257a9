//! Measuring helpers the benchmark runs inside the testbed's laptop (`cargo xtask bench-tool`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

use anyhow::Result;

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
    }
    Ok(())
}

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
