//! The control listener: the socket every stage process connects to, and one reader thread
//! per connection that turns what the stage says into engine events.
//!
//! A connection is accepted only from a peer of this user; its pid is taken from the kernel
//! (the peer's credentials), never from what it says, and it is how the engine matches the
//! connection to the stage whose process has that pid. The engine writes to the stage over the
//! same connection (see `dataplane.rs`).

use std::os::fd::AsFd;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use gptossd_shared::protocol::{read_message, WorkerMsg};
use interprocess::local_socket::traits::ListenerExt as _;
use interprocess::local_socket::{GenericNamespaced, ListenerOptions, ToNsName};
use interprocess::os::unix::uds_local_socket::{Listener, Stream};

use super::Event;

/// Creates the control socket (an abstract name unique to this pipeline) and starts accepting
/// stage connections; returns the name the stages are given.
pub fn listen(events: Sender<Event>) -> std::io::Result<String> {
    let name = format!("gptossd-{}-{:016x}.sock", std::process::id(), random_u64());
    let listener = ListenerOptions::new()
        .name(name.as_str().to_ns_name::<GenericNamespaced>()?)
        .create_sync_as::<Listener>()?;
    std::thread::Builder::new()
        .name("control-accept".into())
        .spawn(move || accept(listener, events))?;
    Ok(name)
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// Accepts stage connections; each gets a reader thread that forwards its messages, then
/// `Disconnected` when the connection ends.
fn accept(listener: Listener, events: Sender<Event>) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let Some(pid) = peer_pid(&stream) else {
            continue;
        };
        let stream = Arc::new(stream);
        let connected = Event::Connected {
            pid,
            stream: stream.clone(),
        };
        if events.send(connected).is_err() {
            return;
        }
        let events = events.clone();
        let _ = std::thread::Builder::new()
            .name(format!("control-{pid}"))
            .spawn(move || loop {
                match read_message::<WorkerMsg>(&mut &*stream) {
                    Ok(msg) => {
                        if events.send(Event::StageMessage { pid, msg }).is_err() {
                            return;
                        }
                    }
                    Err(_) => {
                        let _ = events.send(Event::Disconnected { pid });
                        return;
                    }
                }
            });
    }
}

/// The peer's pid, if it runs as this user.
fn peer_pid(stream: &Stream) -> Option<u32> {
    let creds =
        nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::PeerCredentials)
            .ok()?;
    (creds.uid() == nix::unistd::getuid().as_raw()).then_some(creds.pid() as u32)
}
