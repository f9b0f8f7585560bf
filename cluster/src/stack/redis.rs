//! Redis from Debian's packages, with its data under the stack's home.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};

use super::install::on_path;
use super::process::ProcessFiles;
use super::{Service, Stack};

/// The local Redis server.
pub struct Redis {
    stack: Stack,
}

impl Redis {
    pub fn new(stack: Stack) -> Self {
        Redis { stack }
    }

    fn dir(&self) -> PathBuf {
        self.stack.home.join("redis")
    }
}

impl Service for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn address(&self) -> String {
        format!("{}:{}", self.stack.endpoints.redis_host, self.stack.endpoints.redis_port)
    }

    fn missing_packages(&self) -> Vec<&'static str> {
        if on_path("redis-server") {
            vec![]
        } else {
            vec!["redis-server"]
        }
    }

    fn prepare(&self, _files: &ProcessFiles) -> Result<()> {
        Ok(())
    }

    fn command(&self) -> Result<Command> {
        let e = &self.stack.endpoints;
        let mut c = Command::new("redis-server");
        c.args(["--bind", &e.redis_host, "--port", &e.redis_port.to_string()])
            .arg("--dir")
            .arg(self.dir())
            .args(["--daemonize", "no"])
            // The read model survives a Redis restart with its frontier key
            // and its data in step: an append-only file. Fsynced once a
            // second, not per write: a crash of the machine loses at most the
            // last second, frontier included, and the committer finds its
            // store behind what it acknowledged on reconnect and the job
            // replays it (`store_rollback` restores an older file under a
            // running job).
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            // The file is rewritten (a fork, which stops Redis for 6-19 ms
            // with a million cards, then a copy of the whole dataset: a
            // child busy for about 16 s, one of the machine's two cores)
            // when it has grown to 5 times its last rewrite and past 8 GB.
            // At the default (twice, 64 MB) a catch-up forked 28 times per
            // 2M events; at 1 GB, real time at 50K events/s (about 170
            // bytes of log an event: 1 GB in two minutes) rewrote every few
            // minutes, and the job fell 7 s behind while a child ran. The
            // price: a restart replays up to 8 GB.
            .args(["--auto-aof-rewrite-percentage", "400", "--auto-aof-rewrite-min-size", "8gb"])
            .args(["--save", ""]);
        Ok(c)
    }

    fn probe(&self) -> Result<()> {
        let mut s = super::connect_briefly(&self.address())?;
        s.write_all(b"PING\r\n")?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf)?;
        if !buf[..n].starts_with(b"+PONG") {
            bail!("PING answered {:?}", String::from_utf8_lossy(&buf[..n]));
        }
        Ok(())
    }
}
