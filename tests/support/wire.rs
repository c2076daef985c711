//! A fast plain-TCP client for the benches: one large read buffer, lines and literals
//! handed out without copying, so that the client is not what a bench measures. Bytes and
//! command lines sent and bytes received are counted (relay CPU per MB and per command).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use memchr::memmem;

/// How long any connect, read or write may take before the bench fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Bytes received and sent, and command lines sent.
    pub rx: u64,
    pub tx: u64,
    pub commands: u64,
}

impl Wire {
    /// Connects with a read buffer of `buffer` bytes (it grows when a line is longer).
    pub fn connect(addr: SocketAddr, buffer: usize) -> Wire {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Wire { stream, buf: vec![0; buffer], pos: 0, end: 0, rx: 0, tx: 0, commands: 0 }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
        self.tx += bytes.len() as u64;
    }

    /// Sends one command line (CRLF added).
    pub fn command(&mut self, line: &[u8]) {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line);
        bytes.extend_from_slice(b"\r\n");
        self.send(&bytes);
        self.commands += 1;
    }

    /// Reads more; keeps the unconsumed bytes, growing the buffer only if it is full of them.
    fn fill(&mut self) {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.pos > 0 {
                self.buf.copy_within(self.pos..self.end, 0);
                self.end -= self.pos;
                self.pos = 0;
            } else {
                let len = self.buf.len();
                self.buf.resize(len * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).expect("read");
        assert!(n > 0, "connection closed by peer");
        self.end += n;
        self.rx += n as u64;
    }

    /// The next line, CRLF included.
    pub fn line(&mut self) -> &[u8] {
        let mut scanned = self.pos;
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf[scanned..self.end]) {
                let start = self.pos;
                self.pos = scanned + i + 1;
                return &self.buf[start..self.pos];
            }
            let offset = self.end - self.pos;
            self.fill();
            scanned = self.pos + offset;
        }
    }

    /// Consumes the next `n` bytes, handing each piece to `sink`.
    pub fn literal(&mut self, mut n: usize, mut sink: impl FnMut(&[u8])) {
        while n > 0 {
            if self.pos == self.end {
                self.fill();
            }
            let take = n.min(self.end - self.pos);
            sink(&self.buf[self.pos..self.pos + take]);
            self.pos += take;
            n -= take;
        }
    }

    /// Consumes a POP3 multi-line body up to and including its terminating `.` line (the
    /// status line, with its CRLF, was just read), handing each piece to `sink`; returns
    /// its length. `finder` looks for `\r\n.\r\n`.
    pub fn pop3_body(&mut self, finder: &memmem::Finder, mut sink: impl FnMut(&[u8])) -> u64 {
        // An empty body: the terminator directly follows the status line.
        while self.end - self.pos < 3 {
            self.fill();
        }
        if &self.buf[self.pos..self.pos + 3] == b".\r\n" {
            sink(b".\r\n");
            self.pos += 3;
            return 3;
        }
        let mut len = 0;
        loop {
            if let Some(i) = finder.find(&self.buf[self.pos..self.end]) {
                let stop = self.pos + i + 5;
                sink(&self.buf[self.pos..stop]);
                len += (stop - self.pos) as u64;
                self.pos = stop;
                return len;
            }
            // Keep the last 4 bytes: they may start the terminator.
            let keep = 4.min(self.end - self.pos);
            let upto = self.end - keep;
            sink(&self.buf[self.pos..upto]);
            len += (upto - self.pos) as u64;
            self.pos = upto;
            self.fill();
        }
    }
}
