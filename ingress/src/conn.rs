//! Connection-level defences of the edge: a cap on the connections one client address
//! may hold, and the clock that gives each request one deadline for its headers and
//! body together. What a newcomer gets wrong: hyper's header timeout stops at the end of
//! the headers, so without the clock a client that sends headers and then a trickle (or
//! nothing) of its body holds a connection slot for as long as it likes.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How connections are counted per client: an IPv4 address, or an IPv6 /64 (one
/// host usually has a whole /64 to pick addresses from).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Open connections per client address, up to `per_client` each (0: no cap).
pub struct ClientSlots {
    per_client: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in [`ClientSlots`]; given back when dropped.
pub struct ClientSlot {
    slots: Arc<ClientSlots>,
    key: Option<IpAddr>,
}

impl ClientSlots {
    pub fn new(per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            per_client,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or `None` when that client holds its cap.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        if self.per_client == 0 {
            return Some(ClientSlot {
                slots: self.clone(),
                key: None,
            });
        }
        let key = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            slots: self.clone(),
            key: Some(key),
        })
    }

    #[cfg(test)]
    fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&client_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&key);
            }
        }
    }
}

/// The answer a connection over its client's cap gets before it is closed. It is
/// written without reading the request: the point is to spend nothing on it.
pub const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\nretry-after: 5\r\nconnection: close\r\n\
content-length: 39\r\n\r\ntoo many connections from this address\n";

/// When the request being read on a connection sent its first byte.
pub struct RequestClock {
    opened: Instant,
    /// Nanoseconds after `opened`.
    started: AtomicU64,
}

impl RequestClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            started: AtomicU64::new(0),
        })
    }

    /// When the current request began; read it as the request is handed over, before
    /// its body is read.
    pub fn started(&self) -> Instant {
        self.opened + Duration::from_nanos(self.started.load(Ordering::Relaxed))
    }

    fn mark(&self) {
        let nanos = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.started.store(nanos, Ordering::Relaxed);
    }
}

/// A connection's socket that stamps the [`RequestClock`] with the first bytes that
/// arrive after an answer was written (or on a fresh connection): the start of the
/// next request. (A request pipelined behind another, read in the same bytes, shares
/// the earlier one's start and so its deadline; Bitrix24 does not pipeline.)
pub struct Stamped<T> {
    io: T,
    clock: Arc<RequestClock>,
    between_requests: bool,
}

impl<T> Stamped<T> {
    pub fn new(io: T, clock: Arc<RequestClock>) -> Self {
        Self {
            io,
            clock,
            between_requests: true,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stamped<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.between_requests && buf.filled().len() > before {
            this.between_requests = false;
            this.clock.mark();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stamped<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.between_requests = true;
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.between_requests = true;
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn clients_are_ipv4_addresses_or_ipv6_slash_64s() {
        assert_eq!(client_key(ip("203.0.113.7")), ip("203.0.113.7"));
        assert_eq!(client_key(ip("::ffff:203.0.113.7")), ip("203.0.113.7"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            client_key(ip("2001:db8:1:2::1"))
        );
        assert_ne!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:3::1"))
        );
    }

    #[test]
    fn a_client_holds_at_most_its_cap_and_gets_slots_back() {
        let slots = ClientSlots::new(2);
        let a = ip("127.0.0.2");
        let first = slots.try_take(a).unwrap();
        let _second = slots.try_take(a).unwrap();
        assert!(slots.try_take(a).is_none());
        // Another address is not affected; an address in the same /64 is.
        assert!(slots.try_take(ip("127.0.0.1")).is_some());
        let six = slots.try_take(ip("2001:db8::1")).unwrap();
        let _six2 = slots.try_take(ip("2001:db8::2")).unwrap();
        assert!(slots.try_take(ip("2001:db8::3")).is_none());
        drop(six);
        assert!(slots.try_take(ip("2001:db8::3")).is_some());
        drop(first);
        assert_eq!(slots.open(a), 1);
        assert!(slots.try_take(a).is_some());
    }

    #[test]
    fn zero_means_no_cap() {
        let slots = ClientSlots::new(0);
        let held: Vec<_> = (0..10_000)
            .map(|_| slots.try_take(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(held.len(), 10_000);
        assert_eq!(slots.open(ip("10.0.0.1")), 0, "nothing counted");
    }

    #[test]
    fn the_refusal_is_a_complete_http_answer() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
    }
}
