//! A port-forward to one port of a pod, as one byte stream over the API server's websocket.
//!
//! kube-rs's `Portforwarder` runs the same protocol through a task, a 1 MiB in-memory pipe each
//! way and 4 KiB reads: every byte is copied three more times, what goes to the pod leaves in
//! 4 KiB websocket messages, and the pipes are deep buffers below ktctl's multiplexer that bulk
//! transfers fill while small requests wait behind them. This stream has none of that: a write
//! (vectored: the TLS records a flush produces) is one websocket message, a message read is
//! handed on as it came.
//!
//! The protocol (portforward over websocket, `v4.channel.k8s.io`): every message starts with a
//! channel byte; for port index i, channel 2i carries data and 2i+1 errors. The first message
//! on each channel is the port number (2 bytes, little-endian). An error message is text, sent
//! once, after which the port is unusable.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::Message;

use super::ClusterError;

/// The largest websocket message a write makes.
const MAX_MESSAGE: usize = 256 * 1024;

const DATA: u8 = 0;
const ERROR: u8 = 1;

type WsError = tokio_tungstenite::tungstenite::Error;

/// Opens a port-forward to `port` of `pod`.
pub async fn open(
    pods: &Api<Pod>,
    pod: &str,
    port: u16,
) -> Result<
    PortForward<
        impl Stream<Item = Result<Message, WsError>>
        + Sink<Message, Error = WsError>
        + Unpin
        + Send
        + use<>,
    >,
    ClusterError,
> {
    let req = kube::core::Request::new(pods.resource_url())
        .portforward(pod, &[port])
        .map_err(|e| ClusterError::PortForward {
            pod: pod.to_string(),
            reason: e.to_string(),
        })?;
    let conn = pods
        .clone()
        .into_client()
        .connect(req)
        .await
        .map_err(|e| ClusterError::api(format!("port-forward to pod {pod}"), e))?;
    Ok(PortForward::new(conn.into_stream(), port))
}

/// One forwarded port as a byte stream. EOF when the API server closes the websocket; the
/// pod's error (say, nothing listens on the port) as an I/O error.
pub struct PortForward<S> {
    ws: S,
    port: u16,
    /// Whether each channel's port-number preamble has arrived.
    data_ready: bool,
    error_ready: bool,
    /// Data received and not yet read.
    pending: Bytes,
    /// The channel closed (EOF, an error): what every later read returns.
    done: Option<Result<(), (io::ErrorKind, String)>>,
}

fn protocol_error(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("port-forward: {what}"))
}

impl<S> PortForward<S> {
    pub fn new(ws: S, port: u16) -> PortForward<S> {
        PortForward {
            ws,
            port,
            data_ready: false,
            error_ready: false,
            pending: Bytes::new(),
            done: None,
        }
    }

    /// Takes one message; `Ok(true)` when it brought data into `pending`.
    fn on_message(&mut self, msg: Message) -> io::Result<bool> {
        let mut bytes = match msg {
            Message::Binary(b) => b,
            Message::Close(_) => {
                self.done = Some(Ok(()));
                return Ok(false);
            }
            // Pings are answered by the websocket layer; nothing else is expected.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(false),
            Message::Text(t) => {
                return Err(protocol_error(format!(
                    "unexpected text message ({} bytes)",
                    t.len()
                )));
            }
        };
        if bytes.is_empty() {
            return Ok(false);
        }
        let channel = bytes.get_u8();
        let ready = match channel {
            DATA => &mut self.data_ready,
            ERROR => &mut self.error_ready,
            other => {
                return Err(protocol_error(format!(
                    "message on unknown channel {other}"
                )));
            }
        };
        if !*ready {
            if bytes.len() < 2 {
                return Err(protocol_error(format!(
                    "channel {channel}: short port preamble"
                )));
            }
            let port = bytes.get_u16_le();
            if port != self.port {
                return Err(protocol_error(format!(
                    "channel {channel} is for port {port}, not {}",
                    self.port
                )));
            }
            *ready = true;
        }
        if bytes.is_empty() {
            return Ok(false);
        }
        if channel == ERROR {
            let text = String::from_utf8_lossy(&bytes).trim().to_string();
            self.done = Some(Err((io::ErrorKind::ConnectionRefused, text)));
            return Ok(false);
        }
        self.pending = bytes;
        Ok(true)
    }
}

impl<S> AsyncRead for PortForward<S>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match &this.done {
                Some(Ok(())) => return Poll::Ready(Ok(())),
                Some(Err((kind, text))) => {
                    return Poll::Ready(Err(io::Error::new(*kind, text.clone())));
                }
                None => {}
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None => this.done = Some(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                Some(Ok(msg)) => {
                    this.on_message(msg)?;
                }
            }
        }
    }
}

impl<S> AsyncWrite for PortForward<S>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let ws = &mut self.ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(io::Error::other)?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let n = total.min(MAX_MESSAGE);
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut msg = Vec::with_capacity(n + 1);
        msg.push(DATA);
        for b in bufs {
            let room = n + 1 - msg.len();
            if room == 0 {
                break;
            }
            msg.extend_from_slice(&b[..b.len().min(room)]);
        }
        Pin::new(&mut *ws)
            .start_send(Message::Binary(msg.into()))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Err = tokio_tungstenite::tungstenite::Error;

    /// A websocket stand-in: messages in from a channel, messages out to another.
    struct Fake {
        rx: mpsc::UnboundedReceiver<Result<Message, Err>>,
        tx: mpsc::UnboundedSender<Message>,
    }

    impl Stream for Fake {
        type Item = Result<Message, Err>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            Pin::new(&mut self.rx).poll_next(cx)
        }
    }

    impl Sink<Message> for Fake {
        type Error = Err;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Err>> {
            Poll::Ready(Ok(()))
        }
        fn start_send(self: Pin<&mut Self>, m: Message) -> Result<(), Err> {
            self.tx.unbounded_send(m).map_err(|_| Err::ConnectionClosed)
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Err>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Err>> {
            Poll::Ready(Ok(()))
        }
    }

    fn fake(
        port: u16,
    ) -> (
        PortForward<Fake>,
        mpsc::UnboundedSender<Result<Message, Err>>,
        mpsc::UnboundedReceiver<Message>,
    ) {
        let (in_tx, in_rx) = mpsc::unbounded();
        let (out_tx, out_rx) = mpsc::unbounded();
        (
            PortForward::new(
                Fake {
                    rx: in_rx,
                    tx: out_tx,
                },
                port,
            ),
            in_tx,
            out_rx,
        )
    }

    fn bin(b: &[u8]) -> Result<Message, Err> {
        Ok(Message::Binary(Bytes::copy_from_slice(b)))
    }

    #[tokio::test]
    async fn data_after_the_preambles_is_read_in_order() {
        let (mut pf, tx, _out) = fake(7443);
        tx.unbounded_send(bin(&[0, 0x13, 0x1d])).unwrap();
        tx.unbounded_send(bin(&[1, 0x13, 0x1d])).unwrap();
        tx.unbounded_send(bin(b"\x00hello ")).unwrap();
        tx.unbounded_send(bin(b"\x00world")).unwrap();
        drop(tx);
        let mut got = String::new();
        pf.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello world");
    }

    #[tokio::test]
    async fn the_pods_error_is_an_io_error_with_its_text() {
        let (mut pf, tx, _out) = fake(7443);
        tx.unbounded_send(bin(&[0, 0x13, 0x1d])).unwrap();
        tx.unbounded_send(bin(&[1, 0x13, 0x1d])).unwrap();
        tx.unbounded_send(bin(b"\x01error forwarding port 7443: connection refused"))
            .unwrap();
        let mut b = [0u8; 16];
        let e = pf.read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert!(e.to_string().contains("connection refused"), "{e}");
        // ...and stays so.
        assert!(pf.read(&mut b).await.is_err());
    }

    #[tokio::test]
    async fn a_wrong_port_or_channel_is_a_protocol_error() {
        let (mut pf, tx, _out) = fake(7443);
        tx.unbounded_send(bin(&[0, 0x50, 0x00])).unwrap();
        let e = pf.read(&mut [0u8; 4]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("port 80, not 7443"), "{e}");

        let (mut pf, tx, _out) = fake(7443);
        tx.unbounded_send(bin(&[5, 1, 2])).unwrap();
        let e = pf.read(&mut [0u8; 4]).await.unwrap_err();
        assert!(e.to_string().contains("unknown channel 5"), "{e}");

        let (mut pf, tx, _out) = fake(7443);
        tx.unbounded_send(bin(&[0, 0x13])).unwrap();
        let e = pf.read(&mut [0u8; 4]).await.unwrap_err();
        assert!(e.to_string().contains("short port preamble"), "{e}");
    }

    #[tokio::test]
    async fn a_short_read_buffer_gets_the_rest_next_time() {
        let (mut pf, tx, _out) = fake(1);
        tx.unbounded_send(bin(&[0, 1, 0, b'a', b'b', b'c', b'd']))
            .unwrap();
        let mut b = [0u8; 3];
        assert_eq!(pf.read(&mut b).await.unwrap(), 3);
        assert_eq!(&b, b"abc");
        assert_eq!(pf.read(&mut b).await.unwrap(), 1);
        assert_eq!(b[0], b'd');
    }

    #[tokio::test]
    async fn a_vectored_write_is_one_message_on_the_data_channel() {
        let (mut pf, _tx, mut out) = fake(7443);
        let n = pf
            .write_vectored(&[io::IoSlice::new(b"abc"), io::IoSlice::new(b"def")])
            .await
            .unwrap();
        assert_eq!(n, 6);
        let big = vec![7u8; MAX_MESSAGE + 10];
        assert_eq!(pf.write(&big).await.unwrap(), MAX_MESSAGE);
        pf.shutdown().await.unwrap();
        drop(pf);
        use futures::StreamExt;
        let m: Vec<Message> = out.by_ref().collect().await;
        assert_eq!(m[0], Message::Binary(Bytes::from_static(b"\x00abcdef")));
        let Message::Binary(b) = &m[1] else {
            panic!("{:?}", m[1])
        };
        assert_eq!(b.len(), MAX_MESSAGE + 1);
        assert_eq!(b[0], DATA);
    }

    #[tokio::test]
    async fn close_is_eof() {
        let (mut pf, tx, _out) = fake(7443);
        tx.unbounded_send(bin(&[0, 0x13, 0x1d])).unwrap();
        tx.unbounded_send(Ok(Message::Close(None))).unwrap();
        let mut v = vec![];
        assert_eq!(pf.read_to_end(&mut v).await.unwrap(), 0);
    }
}
