//! `tripwire forward LISTEN=TARGET ...`: a plain TCP relay.
//!
//! The network-namespace test runs job processes in namespaces of their own,
//! where loopback is their own too; relays (in the namespace, and on the
//! host's bridge address) carry their connections to the stack on the host's
//! loopback without changing any address the jobs or Kafka advertise.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;

use anyhow::{Context, Result};

/// Relay every connection to `listen` to `target`, from threads of their own; returns once listening.
pub fn relay(listen: &str, target: &str) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let target = target.to_string();
    thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let target = target.clone();
            thread::spawn(move || {
                if let Ok(server) = TcpStream::connect(&target) {
                    let _ = pipe(client, server);
                }
            });
        }
    });
    Ok(())
}

/// Copy both ways until either side closes.
fn pipe(a: TcpStream, b: TcpStream) -> io::Result<()> {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (mut a_read, mut b_write) = (a.try_clone()?, b.try_clone()?);
    let there = thread::spawn(move || {
        let _ = io::copy(&mut a_read, &mut b_write);
        let _ = b_write.shutdown(Shutdown::Write);
    });
    let (mut b_read, mut a_write) = (b, a);
    let _ = io::copy(&mut b_read, &mut a_write);
    let _ = a_write.shutdown(Shutdown::Write);
    let _ = there.join();
    Ok(())
}

/// `LISTEN=TARGET` pairs, each relayed; then wait forever.
pub fn run(mappings: &[String]) -> Result<()> {
    for m in mappings {
        let (listen, target) =
            m.split_once('=').with_context(|| format!("{m:?} is not LISTEN=TARGET"))?;
        relay(listen, target)?;
    }
    eprintln!("forward: relaying {}", mappings.join(", "));
    loop {
        thread::park();
    }
}
