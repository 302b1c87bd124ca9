//! The in-process link: two unbounded flume channels, no serialization.
//!
//! Unbounded on purpose: the gateway bounds what it admits (max-num-seqs, body
//! sizes), and an engine output batch must never wait on a slow client.

use crate::*;

struct FlumeTx<T>(flume::Sender<T>);
struct FlumeRx<T>(flume::Receiver<T>);

impl CommandTx for FlumeTx<ToEngine> {
    fn send(&self, msg: ToEngine) -> Result<(), TransportError> {
        self.0.send(msg).map_err(|_| TransportError::Closed)
    }
}

impl OutputTx for FlumeTx<FromEngine> {
    fn send(&mut self, msg: FromEngine) -> Result<(), TransportError> {
        self.0.send(msg).map_err(|_| TransportError::Closed)
    }
}

impl CommandRx for FlumeRx<ToEngine> {
    fn recv(&mut self) -> Result<ToEngine, TransportError> {
        self.0.recv().map_err(|_| TransportError::Closed)
    }
}

impl OutputRx for FlumeRx<FromEngine> {
    fn recv(&mut self) -> BoxFuture<'_, Result<FromEngine, TransportError>> {
        Box::pin(async move { self.0.recv_async().await.map_err(|_| TransportError::Closed) })
    }
}

/// A connected pair of ends for an engine running in the gateway's process.
pub fn flume_link() -> (GatewayEnd, EngineEnd) {
    let (cmd_tx, cmd_rx) = flume::unbounded();
    let (out_tx, out_rx) = flume::unbounded();
    (
        GatewayEnd { tx: Box::new(FlumeTx(cmd_tx)), rx: Box::new(FlumeRx(out_rx)) },
        EngineEnd { rx: Box::new(FlumeRx(cmd_rx)), tx: Box::new(FlumeTx(out_tx)) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_arrive_in_order_and_close_is_seen() {
        let (mut gw, mut eng) = flume_link();
        for id in 0..3 {
            gw.tx.send(ToEngine::Command(EngineCommand::Abort(vec![id]))).unwrap();
        }
        for id in 0..3 {
            assert_eq!(eng.rx.recv().unwrap(), ToEngine::Command(EngineCommand::Abort(vec![id])));
        }
        let out = EngineOutputs { rank: 7, outputs: vec![], stats: EngineStats::default(), kv_events: vec![KvEvent::Cleared] };
        eng.tx.send(FromEngine::Outputs(out.clone())).unwrap();
        drop(eng);
        let got = futures_lite_block_on(gw.rx.recv()).unwrap();
        assert_eq!(got, FromEngine::Outputs(out));
        assert_eq!(futures_lite_block_on(gw.rx.recv()), Err(TransportError::Closed));
    }

    /// A minimal executor for the test: flume's futures only need a waker that unparks.
    fn futures_lite_block_on<F: Future>(f: F) -> F::Output {
        use std::sync::Arc;
        use std::task::{Context, Poll, Wake, Waker};
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }
}
