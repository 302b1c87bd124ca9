//! Bounds on request bodies, for every HTTP version: the whole body must
//! arrive within a time limit, and one connection may not hold more than a
//! set number of body bytes across its streams at once. A stalled or greedy
//! body fails its read, so the handler answers at once and the stream (or
//! HTTP/1.1 connection) ends, freeing what it held.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The most of one request body the API reads into memory (4 MiB: a full
/// 128k-token prompt as JSON token ids); past it the body is refused with 413
/// and what still comes is thrown away unread, so it counts against no budget.
pub const MAX_REQUEST_BODY_BYTES: usize = 4 << 20;

/// Body bytes one connection holds now, across its streams.
#[derive(Debug, Default)]
pub(crate) struct ConnBudget {
    held: AtomicUsize,
}

impl ConnBudget {
    pub(crate) fn new() -> Arc<ConnBudget> {
        Arc::new(ConnBudget::default())
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the request body did not arrive within {0:?}")]
    TimedOut(Duration),
    #[error("this connection's request bodies hold more than {0} bytes at once")]
    ConnectionBudget(usize),
    #[error("{0}")]
    Inner(axum::BoxError),
}

/// A request body under a deadline and its connection's byte budget.
pub(crate) struct GuardedBody {
    inner: axum::body::Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    budget: Arc<ConnBudget>,
    cap: usize,
    /// What this body has added to its connection's count.
    counted: usize,
}

impl GuardedBody {
    pub(crate) fn new(inner: axum::body::Body, timeout: Duration, budget: Arc<ConnBudget>, cap: usize) -> Self {
        GuardedBody { inner, deadline: Box::pin(tokio::time::sleep(timeout)), timeout, budget, cap, counted: 0 }
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    // Bytes past what a handler keeps are discarded as they come.
                    let n = data.len().min(MAX_REQUEST_BODY_BYTES.saturating_sub(this.counted));
                    let now = this.budget.held.fetch_add(n, Ordering::AcqRel) + n;
                    this.counted += n;
                    if now > this.cap {
                        return Poll::Ready(Some(Err(BodyError::ConnectionBudget(this.cap))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Inner(e.into())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::TimedOut(this.timeout)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.counted, Ordering::AcqRel);
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_stalled_body_times_out_and_a_greedy_connection_is_refused() {
        // A body that never ends.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let stalled = axum::body::Body::new(http_body_util::StreamBody::new(tokio_stream_from(rx)));
        tx.send(Ok(Frame::data(Bytes::from_static(b"{\"a\":")))).await.unwrap();
        let budget = ConnBudget::new();
        let b = GuardedBody::new(stalled, Duration::from_millis(100), budget.clone(), 1 << 20);
        let e = b.collect().await.expect_err("must time out");
        assert!(matches!(e, BodyError::TimedOut(_)), "{e}");
        assert_eq!(budget.held.load(Ordering::Acquire), 0, "dropping the body gives its bytes back");
        drop(tx);

        let two = || axum::body::Body::from(vec![0u8; 600]);
        let keep = GuardedBody::new(two(), Duration::from_secs(5), budget.clone(), 1000);
        let mut keep = Box::pin(keep);
        let _ = keep.frame().await; // 600 held
        let other = GuardedBody::new(two(), Duration::from_secs(5), budget.clone(), 1000);
        let e = other.collect().await.expect_err("over the connection's budget");
        assert!(matches!(e, BodyError::ConnectionBudget(1000)), "{e}");
        drop(keep);
        assert_eq!(budget.held.load(Ordering::Acquire), 0);
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send + 'static {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
