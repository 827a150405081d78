//! A TCP relay that can cut a server off and restore it: open connections are reset and new ones
//! closed at once while cut, as when a database or object store goes down, without stopping a
//! server other tests share. It runs on a thread of its own, so tests that block on clients do
//! not stall it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Outage {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Outage {
    /// Relays a free loopback port to `target`.
    pub fn start(target: SocketAddr) -> Outage {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the relay's port");
        std_listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = std_listener.local_addr().expect("the relay's address");
        let down = Arc::new(AtomicBool::new(false));
        let (cuts, cut_seen) = watch::channel(0u64);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn({
            let down = down.clone();
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the relay's runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("a tokio listener");
                    tokio::select! {
                        _ = stopped => {}
                        _ = relay(listener, target, down, cut_seen) => {}
                    }
                });
            }
        });
        Outage {
            addr,
            down,
            cuts,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resets every open connection and closes new ones until [`Outage::restore`].
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

async fn relay(
    listener: TcpListener,
    target: SocketAddr,
    down: Arc<AtomicBool>,
    cuts: watch::Receiver<u64>,
) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        if down.load(Ordering::SeqCst) {
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        let mut cuts = cuts.clone();
        cuts.mark_unchanged();
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(target).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = cuts.changed() => {
                    // A reset, not a polite close: the peer sees the connection die.
                    let _ = client.set_zero_linger();
                    let _ = server.set_zero_linger();
                }
            }
        });
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
