//! Accepting connections with the hygiene tonic's own `TcpIncoming` lacks: a cap on open
//! connections, a deadline for a new connection's handshake (a peer that connects and never
//! sends the HTTP/2 preface and its first SETTINGS frame — silent, one byte, the preface alone,
//! a byte a second — is closed, so such sockets cannot hold every connection permit and lock
//! clients out), and a pause instead of a busy loop when `accept` fails (EMFILE).
//!
//! HTTP/2 and TCP keepalive (configured on the server builder) take over once the handshake is
//! done: they find dead and half-open peers among established connections.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

/// Limits on accepted connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Most connections open at once; beyond it new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// How long a new connection may take to send its handshake bytes before it is closed.
    pub first_bytes_within: Duration,
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The preface plus the header of the frame after it (the client's SETTINGS).
const PREFACE_AND_FRAME_HEADER: usize = PREFACE.len() + 9;
/// HTTP/2's default largest frame payload: a first frame claiming more is not waited for.
const MAX_FIRST_FRAME: u64 = 16_384;

/// How far a new connection is through its handshake bytes: the HTTP/2 preface and the whole
/// first frame after it. Bytes that are not a plaintext preface (TLS) need only
/// `PREFACE_AND_FRAME_HEADER` bytes; the TLS layer bounds the rest.
#[derive(Debug, Default)]
struct Handshake {
    head: Vec<u8>,
    received: u64,
    needed: Option<u64>,
}

impl Handshake {
    /// Counts `bytes`; true once the handshake bytes are all in.
    fn observe(&mut self, bytes: &[u8]) -> bool {
        let room = PREFACE_AND_FRAME_HEADER.saturating_sub(self.head.len());
        self.head.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.received += bytes.len() as u64;
        if self.needed.is_none() && self.head.len() == PREFACE_AND_FRAME_HEADER {
            let frame = &self.head[PREFACE.len()..];
            let payload =
                u64::from(frame[0]) << 16 | u64::from(frame[1]) << 8 | u64::from(frame[2]);
            self.needed = Some(if self.head.starts_with(PREFACE) {
                PREFACE_AND_FRAME_HEADER as u64 + payload.min(MAX_FIRST_FRAME)
            } else {
                PREFACE_AND_FRAME_HEADER as u64
            });
        }
        self.needed.is_some_and(|needed| self.received >= needed)
    }
}

/// An accepted connection: the socket, its place under the cap, and the deadline for its
/// handshake bytes (gone once they are in).
pub struct GuardedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    handshake_deadline: Option<Pin<Box<Sleep>>>,
    handshake: Handshake,
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() > before
        {
            if self.handshake_deadline.is_some() && self.handshake.observe(&buf.filled()[before..])
            {
                self.handshake_deadline = None;
            }
            return polled;
        }
        if polled.is_pending()
            && let Some(deadline) = self.handshake_deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not complete its handshake in time",
            )));
        }
        polled
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for GuardedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// Accepts connections on `listener` under `limits`, with TCP_NODELAY (without it small
/// responses wait ~40 ms for delayed ACKs), as a stream for `serve_with_incoming`.
pub fn guarded_incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> ReceiverStream<io::Result<GuardedStream>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            // Wait for a free slot first: at the cap, peers queue in the kernel's backlog.
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = tx.closed() => return,
            };
            match stream {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let guarded = GuardedStream {
                        stream,
                        _permit: permit,
                        handshake_deadline: Some(Box::pin(tokio::time::sleep(
                            limits.first_bytes_within,
                        ))),
                        handshake: Handshake::default(),
                    };
                    if tx.send(Ok(guarded)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // Out of descriptors or a transient error: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_frame(payload: usize) -> Vec<u8> {
        let mut frame = vec![
            (payload >> 16) as u8,
            (payload >> 8) as u8,
            payload as u8,
            4,
            0,
        ];
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend(std::iter::repeat_n(0u8, payload));
        frame
    }

    #[test]
    fn the_handshake_is_the_preface_and_the_whole_first_frame() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(settings_frame(12));
        // All at once.
        assert!(Handshake::default().observe(&bytes));
        // A byte at a time: done exactly at the last byte of the SETTINGS payload.
        let mut h = Handshake::default();
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(h.observe(&[*b]), i == bytes.len() - 1, "byte {i}");
        }
        // One byte, the preface alone, or the preface and a frame header whose payload never
        // comes: not done.
        assert!(!Handshake::default().observe(b"P"));
        assert!(!Handshake::default().observe(PREFACE));
        assert!(!Handshake::default().observe(&bytes[..PREFACE_AND_FRAME_HEADER + 3]));
    }

    #[test]
    fn bytes_that_are_not_a_plaintext_preface_need_only_the_fixed_minimum() {
        // A TLS ClientHello starts with 0x16; its record layer bounds the rest.
        let hello = [0x16u8; PREFACE_AND_FRAME_HEADER];
        let mut h = Handshake::default();
        assert!(!h.observe(&hello[..PREFACE_AND_FRAME_HEADER - 1]));
        assert!(h.observe(&hello[PREFACE_AND_FRAME_HEADER - 1..]));
        // A first frame claiming a huge payload is waited for only up to the default frame size.
        let mut bytes = PREFACE.to_vec();
        bytes.extend(settings_frame(0));
        bytes[PREFACE.len()] = 0xff;
        let mut h = Handshake::default();
        assert!(!h.observe(&bytes));
        assert!(h.observe(&vec![0u8; MAX_FIRST_FRAME as usize]));
    }
}
