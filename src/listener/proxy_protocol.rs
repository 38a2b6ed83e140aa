//! The PROXY protocol header (HAProxy's proxy-protocol.txt, v1 text and v2 binary) that a
//! load balancer in front sends before the client's bytes, naming the client's address.
//!
//! [`read_header`] reads whatever the socket has (usually the header and the request head
//! in one read) and leaves every byte past the header in the caller's buffer, so the HTTP
//! parser starts from there and nothing is lost.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v1 signature.
pub const V1_SIGNATURE: &[u8; 6] = b"PROXY ";
/// The v2 signature.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included (the spec's bound).
pub const V1_MAX_LEN: usize = 107;
/// The longest v2 address and TLV block we accept. The addresses take at most 216 bytes;
/// the rest leaves room for the TLVs load balancers add (AWS, GCP, HAProxy's SSL ones).
pub const V2_MAX_PAYLOAD: usize = 2048;

/// Spare room for each read: enough for a header and a typical request head.
const READ_CHUNK: usize = 2048;

pub use crate::config::ProxyProtocol;

/// The client's and the proxy's addresses as the header gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyAddrs {
    /// The client.
    pub source: SocketAddr,
    /// The address the client connected to (the load balancer's).
    pub destination: SocketAddr,
}

/// Why a connection's header was refused; the connection should be answered 400 or closed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    /// The connection does not start with the header the mode requires.
    #[error("PROXY protocol header missing")]
    Missing,
    /// The header breaks the spec.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// The header is valid but not something we take.
    #[error("unsupported PROXY protocol header: {0}")]
    Unsupported(&'static str),
    /// Reading failed.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

use ProxyProtocolError::{Malformed, Missing, Unsupported};

/// Reads the header `mode` asks for from `stream`.
///
/// Bytes already in `buf` count as the stream's first bytes. On success `buf` holds
/// exactly the bytes read past the header (all of them when there was none), for the HTTP
/// parser. `None` when the header names no address (v1 `UNKNOWN`, v2 `LOCAL`, `AF_UNSPEC`,
/// `AF_UNIX`), when `mode` is [`ProxyProtocol::Off`] (nothing is read), or in
/// [`ProxyProtocol::Optional`] mode when the stream does not start with a header (decided
/// on the first bytes that differ from both signatures, or at end of stream). The caller
/// bounds the wait with a timeout.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    mode: ProxyProtocol,
    buf: &mut Vec<u8>,
) -> Result<Option<ProxyAddrs>, ProxyProtocolError> {
    if mode == ProxyProtocol::Off {
        return Ok(None);
    }
    loop {
        match parse(buf, mode)? {
            Step::Header { len, addrs } => {
                buf.drain(..len);
                return Ok(addrs);
            }
            Step::Absent => return Ok(None),
            Step::More => {}
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 2 {
            buf.reserve(READ_CHUNK);
        }
        if stream.read_buf(buf).await? == 0 {
            return at_eof(buf, mode);
        }
    }
}

/// The stream ended before a decision.
fn at_eof(buf: &[u8], mode: ProxyProtocol) -> Result<Option<ProxyAddrs>, ProxyProtocolError> {
    let committed = buf.starts_with(V1_SIGNATURE) || buf.starts_with(V2_SIGNATURE);
    match mode {
        // A prefix of a signature that ends there was not a header.
        ProxyProtocol::Optional if !committed => Ok(None),
        _ if buf.is_empty() => Err(Missing),
        _ => Err(Malformed("truncated header")),
    }
}

#[derive(Debug, PartialEq)]
enum Step {
    /// A header of `len` bytes.
    Header {
        len: usize,
        addrs: Option<ProxyAddrs>,
    },
    /// No header (Optional mode).
    Absent,
    /// Undecided: read more.
    More,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sig {
    Full,
    /// `buf` is a proper prefix of the signature (or empty).
    Prefix,
    No,
}

fn signature(buf: &[u8], sig: &[u8]) -> Sig {
    if buf.starts_with(sig) {
        Sig::Full
    } else if sig.starts_with(buf) {
        Sig::Prefix
    } else {
        Sig::No
    }
}

fn parse(buf: &[u8], mode: ProxyProtocol) -> Result<Step, ProxyProtocolError> {
    let v1 = signature(buf, V1_SIGNATURE);
    let v2 = signature(buf, V2_SIGNATURE);
    match mode {
        ProxyProtocol::Off => Ok(Step::Absent),
        ProxyProtocol::V1 => match (v1, v2) {
            (Sig::Full, _) => parse_v1(buf),
            (_, Sig::Full) => Err(Unsupported("a v2 header where v1 is expected")),
            (Sig::Prefix, _) | (_, Sig::Prefix) => Ok(Step::More),
            _ => Err(Missing),
        },
        ProxyProtocol::V2 => match (v1, v2) {
            (_, Sig::Full) => parse_v2(buf),
            (Sig::Full, _) => Err(Unsupported("a v1 header where v2 is expected")),
            (Sig::Prefix, _) | (_, Sig::Prefix) => Ok(Step::More),
            _ => Err(Missing),
        },
        ProxyProtocol::Optional => match (v1, v2) {
            (Sig::Full, _) => parse_v1(buf),
            (_, Sig::Full) => parse_v2(buf),
            (Sig::Prefix, _) | (_, Sig::Prefix) => Ok(Step::More),
            _ => Ok(Step::Absent),
        },
    }
}

/// `PROXY TCP4|TCP6 src dst sport dport\r\n` or `PROXY UNKNOWN...\r\n`; `buf` starts with
/// the signature.
fn parse_v1(buf: &[u8]) -> Result<Step, ProxyProtocolError> {
    const TOO_LONG: ProxyProtocolError = Malformed("v1 header longer than 107 bytes");
    const NO_CRLF: ProxyProtocolError = Malformed("v1 line not ended by CRLF");
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(cr) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if buf.len() >= V1_MAX_LEN {
            Err(TOO_LONG)
        } else {
            Ok(Step::More)
        };
    };
    if buf[cr] == b'\n' {
        return Err(NO_CRLF);
    }
    if cr + 2 > V1_MAX_LEN {
        return Err(TOO_LONG);
    }
    match buf.get(cr + 1) {
        None => return Ok(Step::More),
        Some(b'\n') => {}
        Some(_) => return Err(NO_CRLF),
    }
    let len = cr + 2;
    let line = std::str::from_utf8(&buf[V1_SIGNATURE.len()..cr])
        .map_err(|_| Malformed("v1 header is not ASCII"))?;
    let mut fields = line.split(' ');
    let v6 = match fields.next() {
        // The spec says to ignore whatever follows UNKNOWN.
        Some("UNKNOWN") => return Ok(Step::Header { len, addrs: None }),
        Some("TCP4") => false,
        Some("TCP6") => true,
        _ => return Err(Malformed("v1 protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(Malformed(
            "v1 header does not have 4 single-space separated fields after the protocol",
        ));
    };
    let addr =
        |ip: &str, port: &str, what: &'static str| -> Result<SocketAddr, ProxyProtocolError> {
            // std's parsers are strict: IPv4 in four decimal parts without leading zeros.
            let ip = if v6 {
                ip.parse::<Ipv6Addr>().map(Into::into)
            } else {
                ip.parse::<Ipv4Addr>().map(Into::into)
            }
            .map_err(|_| Malformed(what))?;
            Ok(SocketAddr::new(ip, v1_port(port)?))
        };
    Ok(Step::Header {
        len,
        addrs: Some(ProxyAddrs {
            source: addr(
                src,
                sport,
                "v1 source address is not one of the protocol's family",
            )?,
            destination: addr(
                dst,
                dport,
                "v1 destination address is not one of the protocol's family",
            )?,
        }),
    })
}

/// 1 to 5 decimal digits, at most 65535 (std's parser alone would take a leading `+`).
fn v1_port(s: &str) -> Result<u16, ProxyProtocolError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Malformed("v1 port is not a decimal number"));
    }
    s.parse().map_err(|_| Malformed("v1 port is above 65535"))
}

/// The 16-byte fixed part, then addresses and TLVs; `buf` starts with the signature.
fn parse_v2(buf: &[u8]) -> Result<Step, ProxyProtocolError> {
    const LOCAL: u8 = 0x0;
    const PROXY: u8 = 0x1;
    let Some(fixed) = buf.get(..16) else {
        return Ok(Step::More);
    };
    if fixed[12] >> 4 != 2 {
        return Err(Malformed("v2 version is not 2"));
    }
    let command = fixed[12] & 0x0f;
    if command != LOCAL && command != PROXY {
        return Err(Malformed("v2 command is neither LOCAL nor PROXY"));
    }
    let family = fixed[13];
    let payload_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if payload_len > V2_MAX_PAYLOAD {
        return Err(Malformed("v2 header longer than 2064 bytes"));
    }
    let len = 16 + payload_len;
    let Some(payload) = buf.get(16..len) else {
        return Ok(Step::More);
    };
    if command == LOCAL {
        // Health checks from the proxy itself: the socket's own addresses apply.
        return Ok(Step::Header { len, addrs: None });
    }
    let short = Malformed("v2 length shorter than its addresses");
    let port = |at: usize| u16::from_be_bytes([payload[at], payload[at + 1]]);
    // The TLVs after the addresses are skipped.
    let addrs = match family {
        // AF_UNSPEC: addresses unknown.
        0x00 => None,
        // TCP over IPv4.
        0x11 => {
            if payload.len() < 12 {
                return Err(short);
            }
            let ip = |at: usize| {
                Ipv4Addr::new(
                    payload[at],
                    payload[at + 1],
                    payload[at + 2],
                    payload[at + 3],
                )
            };
            Some(ProxyAddrs {
                source: SocketAddr::new(ip(0).into(), port(8)),
                destination: SocketAddr::new(ip(4).into(), port(10)),
            })
        }
        // TCP over IPv6.
        0x21 => {
            if payload.len() < 36 {
                return Err(short);
            }
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&payload[at..at + 16]);
                Ipv6Addr::from(octets)
            };
            Some(ProxyAddrs {
                source: SocketAddr::new(ip(0).into(), port(32)),
                destination: SocketAddr::new(ip(16).into(), port(34)),
            })
        }
        0x12 | 0x22 => return Err(Unsupported("v2 DGRAM (UDP) connection")),
        // AF_UNIX, stream or datagram: no IP address to take.
        0x31 | 0x32 => None,
        _ => return Err(Malformed("v2 unknown address family or transport")),
    };
    Ok(Step::Header { len, addrs })
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncWriteExt, ReadBuf};

    use super::*;

    /// Yields its data `step` bytes per read, then end of stream.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let me = self.get_mut();
            let n = me.step.min(me.data.len() - me.pos).min(buf.remaining());
            buf.put_slice(&me.data[me.pos..me.pos + n]);
            me.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    /// Reads `data` in one go and 1, 2, 5 and 13 bytes at a time; every way must agree.
    /// Returns the result and, on success, what follows the header: the bytes left in the
    /// buffer, then those not read yet.
    async fn read(
        data: &[u8],
        mode: ProxyProtocol,
    ) -> (Result<Option<ProxyAddrs>, String>, Vec<u8>) {
        let mut first = None;
        for step in [usize::MAX, 1, 2, 5, 13] {
            let mut s = Trickle {
                data: data.to_vec(),
                pos: 0,
                step,
            };
            let mut buf = Vec::new();
            let got = read_header(&mut s, mode, &mut buf)
                .await
                .map_err(|e| e.to_string());
            if got.is_ok() {
                buf.extend_from_slice(&s.data[s.pos..]);
            } else {
                buf.clear();
            }
            let got = (got, buf);
            match &first {
                None => first = Some(got),
                Some(f) => assert_eq!(f, &got, "step {step}"),
            }
        }
        first.unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const HTTP: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

    fn with_http(header: &[u8]) -> Vec<u8> {
        [header, HTTP].concat()
    }

    fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
        h.extend_from_slice(payload);
        h
    }

    /// Two TLVs: ALPN "h2" and an AWS-like type 0xEA with 8 bytes.
    const TLVS: &[u8] = &[
        0x01, 0x00, 0x02, b'h', b'2', 0xea, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8,
    ];

    fn v2_inet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(tlvs);
        v2(1, 0x11, &p)
    }

    #[tokio::test]
    async fn v1_tcp4_leaves_the_request() {
        let data = with_http(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n");
        for mode in [ProxyProtocol::V1, ProxyProtocol::Optional] {
            let (got, rest) = read(&data, mode).await;
            assert_eq!(
                got,
                Ok(Some(ProxyAddrs {
                    source: sa("192.0.2.1:56324"),
                    destination: sa("198.51.100.2:443"),
                }))
            );
            assert_eq!(rest, HTTP);
        }
    }

    #[tokio::test]
    async fn v1_tcp6_and_port_bounds() {
        let data = with_http(b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.9 0 65535\r\n");
        let (got, rest) = read(&data, ProxyProtocol::V1).await;
        assert_eq!(
            got,
            Ok(Some(ProxyAddrs {
                source: sa("[2001:db8::1]:0"),
                destination: sa("[::ffff:192.0.2.9]:65535"),
            }))
        );
        assert_eq!(rest, HTTP);
    }

    #[tokio::test]
    async fn v1_unknown_names_no_address() {
        for header in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff:f::1 ffff:f::2 65535 65535\r\n",
        ] {
            let (got, rest) = read(&with_http(header), ProxyProtocol::V1).await;
            assert_eq!(got, Ok(None));
            assert_eq!(rest, HTTP);
        }
    }

    #[tokio::test]
    async fn v1_longest_headers_fit() {
        let max = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let unknown = format!("PROXY UNKNOWN {max} {max} 65535 65535\r\n");
        assert_eq!(unknown.len(), V1_MAX_LEN);
        let (got, rest) = read(&with_http(unknown.as_bytes()), ProxyProtocol::V1).await;
        assert_eq!(got, Ok(None));
        assert_eq!(rest, HTTP);
        let tcp6 = format!("PROXY TCP6 {max} {max} 65535 65535\r\n");
        let (got, rest) = read(&with_http(tcp6.as_bytes()), ProxyProtocol::V1).await;
        assert!(matches!(got, Ok(Some(_))), "{got:?}");
        assert_eq!(rest, HTTP);
    }

    #[tokio::test]
    async fn v1_malformed() {
        let cases: &[(&[u8], &str)] = &[
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "CRLF"),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "4 single-space"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "4 single-space"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "4 single-space"),
            (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
            (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n", "port"),
            (b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n", "source address"),
            (
                b"PROXY TCP6 2001:db8::1 5.6.7.8 1 2\r\n",
                "destination address",
            ),
            (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "source address"),
            (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "source address"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n", "ASCII"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", "truncated"),
            (b"PROX", "truncated"),
        ];
        for (data, want) in cases {
            let (got, _) = read(data, ProxyProtocol::V1).await;
            let e = got.unwrap_err();
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(data));
        }
        // 107 bytes without a line end, then more.
        let long = [&b"PROXY UNKNOWN "[..], &[b'x'; 120]].concat();
        let (got, _) = read(&long, ProxyProtocol::V1).await;
        assert!(got.unwrap_err().contains("longer than 107"));
        // The CR as the 107th byte, LF past the bound.
        let long = [&b"PROXY UNKNOWN "[..], &[b'x'; 92], b"\r\n"].concat();
        assert_eq!(long.len(), 108);
        let (got, _) = read(&long, ProxyProtocol::V1).await;
        assert!(got.unwrap_err().contains("longer than 107"));
    }

    #[tokio::test]
    async fn missing_or_other_version() {
        for mode in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let (got, _) = read(HTTP, mode).await;
            assert_eq!(got, Err("PROXY protocol header missing".into()));
            let (got, _) = read(b"", mode).await;
            assert_eq!(got, Err("PROXY protocol header missing".into()));
        }
        // A v1-lookalike that differs at its first bytes is no header either.
        let (got, _) = read(b"PROXZ TCP4", ProxyProtocol::V1).await;
        assert_eq!(got, Err("PROXY protocol header missing".into()));
        let (got, _) = read(&v2_inet([1; 4], [2; 4], 1, 2, &[]), ProxyProtocol::V1).await;
        assert!(got.unwrap_err().contains("v2 header where v1"));
        let (got, _) = read(b"PROXY UNKNOWN\r\n", ProxyProtocol::V2).await;
        assert!(got.unwrap_err().contains("v1 header where v2"));
    }

    #[tokio::test]
    async fn v2_proxy_ipv4_with_tlvs() {
        let data = with_http(&v2_inet(
            [192, 0, 2, 1],
            [198, 51, 100, 2],
            56324,
            443,
            TLVS,
        ));
        for mode in [ProxyProtocol::V2, ProxyProtocol::Optional] {
            let (got, rest) = read(&data, mode).await;
            assert_eq!(
                got,
                Ok(Some(ProxyAddrs {
                    source: sa("192.0.2.1:56324"),
                    destination: sa("198.51.100.2:443"),
                }))
            );
            assert_eq!(rest, HTTP);
        }
    }

    #[tokio::test]
    async fn v2_proxy_ipv6() {
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let mut p = Vec::new();
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&65535u16.to_be_bytes());
        p.extend_from_slice(&8443u16.to_be_bytes());
        p.extend_from_slice(TLVS);
        let (got, rest) = read(&with_http(&v2(1, 0x21, &p)), ProxyProtocol::V2).await;
        assert_eq!(
            got,
            Ok(Some(ProxyAddrs {
                source: sa("[2001:db8::1]:65535"),
                destination: sa("[2001:db8::2]:8443"),
            }))
        );
        assert_eq!(rest, HTTP);
    }

    #[tokio::test]
    async fn v2_without_an_address() {
        // LOCAL (whatever its family), AF_UNSPEC, AF_UNIX stream.
        let local = v2(0, 0x11, &[&[0u8; 12][..], TLVS].concat());
        let unspec = v2(1, 0x00, TLVS);
        let unix = v2(1, 0x31, &[0u8; 216]);
        for header in [local, v2(0, 0x00, &[]), unspec, unix] {
            let (got, rest) = read(&with_http(&header), ProxyProtocol::V2).await;
            assert_eq!(got, Ok(None));
            assert_eq!(rest, HTTP);
        }
    }

    #[tokio::test]
    async fn v2_malformed_or_unsupported() {
        let mut bad_version = v2_inet([1; 4], [2; 4], 1, 2, &[]);
        bad_version[12] = 0x11;
        let mut bad_command = v2_inet([1; 4], [2; 4], 1, 2, &[]);
        bad_command[12] = 0x22;
        let mut too_long = v2(1, 0x11, &[]);
        too_long[14..16].copy_from_slice(&u16::try_from(V2_MAX_PAYLOAD + 1).unwrap().to_be_bytes());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (bad_version, "version"),
            (bad_command, "command"),
            (too_long, "longer than"),
            (v2(1, 0x12, &[0; 12]), "DGRAM"),
            (v2(1, 0x22, &[0; 36]), "DGRAM"),
            (v2(1, 0x10, &[0; 12]), "unknown address family"),
            (v2(1, 0x41, &[0; 12]), "unknown address family"),
            (v2(1, 0x11, &[0; 11]), "shorter than its addresses"),
            (v2(1, 0x21, &[0; 35]), "shorter than its addresses"),
            // Cut inside the fixed part, then inside the addresses.
            (
                v2_inet([1; 4], [2; 4], 1, 2, &[])[..14].to_vec(),
                "truncated",
            ),
            (
                v2_inet([1; 4], [2; 4], 1, 2, &[])[..20].to_vec(),
                "truncated",
            ),
            (V2_SIGNATURE[..5].to_vec(), "truncated"),
        ];
        for (data, want) in cases {
            let (got, _) = read(&data, ProxyProtocol::V2).await;
            let e = got.unwrap_err();
            assert!(e.contains(want), "{data:?}: {e}");
        }
        // Optional mode: a truncated header after a full signature is an error too.
        let (got, _) = read(
            &v2_inet([1; 4], [2; 4], 1, 2, &[])[..20],
            ProxyProtocol::Optional,
        )
        .await;
        assert!(got.unwrap_err().contains("truncated"));
    }

    #[tokio::test]
    async fn optional_plain_streams_keep_every_byte() {
        let mut garbage_after_v2_prefix = V2_SIGNATURE[..7].to_vec();
        garbage_after_v2_prefix.extend_from_slice(b"QUXT\nmore bytes");
        let cases: Vec<Vec<u8>> = vec![
            HTTP.to_vec(),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            b"PROXZ".to_vec(),
            b"PROX".to_vec(),
            garbage_after_v2_prefix,
            V2_SIGNATURE[..11].to_vec(),
            b"\r\n\r\nGET".to_vec(),
            Vec::new(),
        ];
        for data in cases {
            let (got, rest) = read(&data, ProxyProtocol::Optional).await;
            assert_eq!(got, Ok(None), "{data:?}");
            assert_eq!(rest, data);
        }
    }

    #[tokio::test]
    async fn off_reads_nothing() {
        let mut s = Trickle {
            data: b"PROXY UNKNOWN\r\n".to_vec(),
            pos: 0,
            step: 100,
        };
        let mut buf = Vec::new();
        let got = read_header(&mut s, ProxyProtocol::Off, &mut buf)
            .await
            .unwrap();
        assert_eq!(got, None);
        assert!(buf.is_empty());
        assert_eq!(s.pos, 0);
    }

    #[tokio::test]
    async fn bytes_already_read_count_and_no_wait_past_the_header() {
        // The header arrives in two writes and the connection stays open: the reader
        // returns at the header's end without waiting for more.
        let (mut client, mut server) = tokio::io::duplex(4096);
        let mut buf = b"PROXY TCP4 ".to_vec();
        client.write_all(b"10.0.0.1 10.0.0.2 1000").await.unwrap();
        let task = tokio::spawn(async move {
            let got = read_header(&mut server, ProxyProtocol::V1, &mut buf).await;
            (got.map_err(|e| e.to_string()), buf)
        });
        tokio::task::yield_now().await;
        client.write_all(b" 80\r\nGET").await.unwrap();
        let (got, buf) = task.await.unwrap();
        assert_eq!(
            got,
            Ok(Some(ProxyAddrs {
                source: sa("10.0.0.1:1000"),
                destination: sa("10.0.0.2:80"),
            }))
        );
        assert_eq!(buf, b"GET");
        drop(client);
    }

    #[test]
    fn mode_from_config() {
        #[derive(serde::Deserialize)]
        struct Cfg {
            #[serde(default)]
            proxy_protocol: ProxyProtocol,
        }
        let parse = |s: &str| toml::from_str::<Cfg>(s).map(|c| c.proxy_protocol);
        assert_eq!(parse("").unwrap(), ProxyProtocol::Off);
        assert_eq!(
            parse(r#"proxy_protocol = "off""#).unwrap(),
            ProxyProtocol::Off
        );
        assert_eq!(
            parse(r#"proxy_protocol = "v1""#).unwrap(),
            ProxyProtocol::V1
        );
        assert_eq!(
            parse(r#"proxy_protocol = "v2""#).unwrap(),
            ProxyProtocol::V2
        );
        assert_eq!(
            parse(r#"proxy_protocol = "optional""#).unwrap(),
            ProxyProtocol::Optional
        );
        assert!(parse(r#"proxy_protocol = "V2""#).is_err());
        assert!(parse(r#"proxy_protocol = "v3""#).is_err());
    }
}
