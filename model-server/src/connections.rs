//! Accepting connections with the hygiene tonic's own `TcpIncoming` lacks: a cap on open
//! connections, a deadline for a new connection's first bytes (a peer that connects and never
//! speaks is closed, so idle sockets cannot pile up until the descriptor limit locks every
//! client out), and a pause instead of a busy loop when `accept` fails (EMFILE).
//!
//! HTTP/2 and TCP keepalive (configured on the server builder) take over once a peer has
//! spoken: they find dead and half-open peers among established connections.

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
    /// How long a new connection may stay silent before it is closed.
    pub first_bytes_within: Duration,
}

/// An accepted connection: the socket, its place under the cap, and the deadline for its first
/// bytes (gone once any byte arrived).
pub struct GuardedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    silent_deadline: Option<Pin<Box<Sleep>>>,
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
            self.silent_deadline = None;
            return polled;
        }
        if polled.is_pending()
            && let Some(deadline) = self.silent_deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer sent nothing after connecting",
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
                        silent_deadline: Some(Box::pin(tokio::time::sleep(
                            limits.first_bytes_within,
                        ))),
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
