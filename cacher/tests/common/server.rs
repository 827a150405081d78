//! In-process HTTP servers on a background thread, for the internal registry and the proxy.

use std::net::SocketAddr;
use std::thread::{self, JoinHandle};

use axum::Router;

/// A router served on 127.0.0.1 by a runtime of its own on a background thread, so tests stay
/// synchronous and a blocked test thread never stalls the server. Dropping it shuts it down.
pub(super) struct BackgroundServer {
    pub(super) addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundServer {
    pub(super) fn start(
        name: &str,
        tls: Option<berth_registry::server::ServerTls>,
        router: impl FnOnce() -> Router + Send + 'static,
    ) -> BackgroundServer {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a server runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind 127.0.0.1:0");
                    addr_tx
                        .send(listener.local_addr().expect("a local address"))
                        .expect("report the address");
                    let shutdown = async {
                        let _ = stopped.await;
                    };
                    berth_registry::server::serve(
                        listener,
                        router(),
                        tls,
                        shutdown,
                        &berth_registry::config::Limits {
                            shutdown_grace_seconds: 1,
                            ..Default::default()
                        },
                    )
                    .await;
                });
            })
            .expect("spawn a server thread");
        BackgroundServer {
            addr: addr_rx.recv().expect("the server's address"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Shuts the server down and waits for its thread; its address stays known.
    pub(super) fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        self.stop();
    }
}
