//! The line formats: `text` (nginx's `combined` followed by the router's `key="value"`
//! fields) and `json` (one object per line), written into a caller's buffer without
//! allocating beyond it.

use std::io::Write;
use std::net::IpAddr;
use std::time::Duration;

use super::time::{epoch, stamp};
use super::Record;

/// Appends `n` in decimal, without allocating or formatting machinery.
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Seconds with milliseconds, as nginx's `$request_time`: `0.012`.
fn push_secs(out: &mut Vec<u8>, d: Duration) {
    push_u64(out, d.as_secs());
    let ms = d.subsec_millis();
    out.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
    ]);
}

fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        // By hand: `write!` costs several times as much, and IPv4 is the usual case.
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_u64(out, octet.into());
            }
        }
        // Writing to a Vec cannot fail.
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Bytes escaped in text values.
const TEXT: u8 = 1;
/// Bytes escaped in JSON strings.
const JSON: u8 = 2;
/// Which bytes each format escapes, looked up once per byte.
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let control = b < 0x20 || b == 0x7f;
        if control || b == b'"' as usize || b == b'\\' as usize {
            t[b] = TEXT | JSON;
        } else if b >= 0x80 {
            t[b] = TEXT;
        }
        b += 1;
    }
    t
};

/// A text value: bytes that are `"`, `\`, control or not ASCII become `\xHH`, as nginx's
/// default escaping does; empty becomes `-`.
fn push_text(out: &mut Vec<u8>, value: &[u8]) {
    if value.is_empty() {
        out.push(b'-');
        return;
    }
    let mut start = 0;
    for (i, &b) in value.iter().enumerate() {
        if ESCAPE[usize::from(b)] & TEXT != 0 {
            out.extend_from_slice(&value[start..i]);
            out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]);
            start = i + 1;
        }
    }
    out.extend_from_slice(&value[start..]);
}

/// A quoted text value: `"..."`, or `"-"` when empty.
fn push_quoted(out: &mut Vec<u8>, value: &[u8]) {
    out.push(b'"');
    push_text(out, value);
    out.push(b'"');
}

/// The text line: nginx's `combined`, then the router's fields.
///
/// `$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent
/// "$http_referer" "$http_user_agent" host="…" service="…" instance="…" bytes_in=N rt=S.mmm
/// urt=S.mmm retries=N rid="…"`, then on a TLS connection ` tls="…" alpn="…"`, then for a
/// service with forward auth ` auth="…"`.
pub fn write_text(rec: &Record<'_>, out: &mut Vec<u8>) {
    let (secs, _) = epoch(rec.time);
    push_ip(out, rec.client);
    out.extend_from_slice(b" - - [");
    out.extend_from_slice(&stamp(secs).clf);
    out.extend_from_slice(b"] \"");
    push_text(out, rec.method.as_bytes());
    out.push(b' ');
    push_text(out, rec.path.as_bytes());
    out.push(b' ');
    out.extend_from_slice(rec.protocol.as_str().as_bytes());
    out.extend_from_slice(b"\" ");
    push_u64(out, rec.status.into());
    out.push(b' ');
    push_u64(out, rec.bytes_out);
    out.push(b' ');
    push_quoted(out, rec.referer);
    out.push(b' ');
    push_quoted(out, rec.user_agent);
    out.extend_from_slice(b" host=");
    push_quoted(out, rec.host.as_bytes());
    out.extend_from_slice(b" service=");
    push_quoted(out, rec.service.as_bytes());
    out.extend_from_slice(b" instance=");
    push_quoted(out, rec.instance.as_bytes());
    out.extend_from_slice(b" bytes_in=");
    push_u64(out, rec.bytes_in);
    out.extend_from_slice(b" rt=");
    push_secs(out, rec.duration);
    out.extend_from_slice(b" urt=");
    match rec.upstream {
        Some(d) => push_secs(out, d),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" retries=");
    push_u64(out, rec.retries.into());
    out.extend_from_slice(b" rid=");
    push_quoted(out, rec.request_id);
    // Only on TLS connections, so that plain lines keep their shape.
    if !rec.tls_version.is_empty() {
        out.extend_from_slice(b" tls=");
        push_quoted(out, rec.tls_version.as_bytes());
        out.extend_from_slice(b" alpn=");
        push_quoted(out, rec.alpn.as_bytes());
    }
    if !rec.auth.is_empty() {
        out.extend_from_slice(b" auth=");
        push_quoted(out, rec.auth.as_bytes());
    }
    out.push(b'\n');
}

/// The inside of a JSON string, from valid UTF-8: `"`, `\` and control characters (DEL
/// too) escaped.
fn push_json_str(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if ESCAPE[usize::from(b)] & JSON == 0 {
            continue;
        }
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if short.is_empty() {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)].to_ascii_lowercase(),
                HEX[usize::from(b & 15)].to_ascii_lowercase(),
            ]);
        } else {
            out.extend_from_slice(short);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// A JSON string from bytes: each invalid UTF-8 sequence becomes U+FFFD (as
/// `String::from_utf8_lossy` reads it).
fn push_json(out: &mut Vec<u8>, value: &[u8]) {
    out.push(b'"');
    if value.is_ascii() {
        // ASCII is UTF-8: no need to look for invalid sequences.
        push_json_str(out, value);
        out.push(b'"');
        return;
    }
    for chunk in value.utf8_chunks() {
        push_json_str(out, chunk.valid().as_bytes());
        if !chunk.invalid().is_empty() {
            out.extend_from_slice(b"\\ufffd");
        }
    }
    out.push(b'"');
}

/// The JSON line: one object, its keys in this order and always present but the TLS ones.
///
/// `{"time":"2026-11-22T10:00:00.123Z","client":…,"host":…,"service":…,"instance":…,
/// "method":…,"path":…,"protocol":"HTTP/1.1","status":200,"bytes_in":0,"bytes_out":0,
/// "duration_us":0,"upstream_duration_us":0|null,"retries":0,"request_id":…,"referer":…,
/// "user_agent":…}`, with `"tls_version"`, `"alpn"` and `"auth"` last, each only when not
/// empty.
pub fn write_json(rec: &Record<'_>, out: &mut Vec<u8>) {
    let (secs, ms) = epoch(rec.time);
    out.extend_from_slice(b"{\"time\":\"");
    out.extend_from_slice(&stamp(secs).iso);
    out.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
        b'"',
    ]);
    out.extend_from_slice(b",\"client\":\"");
    push_ip(out, rec.client);
    out.extend_from_slice(b"\",\"host\":");
    push_json(out, rec.host.as_bytes());
    out.extend_from_slice(b",\"service\":");
    push_json(out, rec.service.as_bytes());
    out.extend_from_slice(b",\"instance\":");
    push_json(out, rec.instance.as_bytes());
    out.extend_from_slice(b",\"method\":");
    push_json(out, rec.method.as_bytes());
    out.extend_from_slice(b",\"path\":");
    push_json(out, rec.path.as_bytes());
    out.extend_from_slice(b",\"protocol\":\"");
    out.extend_from_slice(rec.protocol.as_str().as_bytes());
    out.extend_from_slice(b"\",\"status\":");
    push_u64(out, rec.status.into());
    out.extend_from_slice(b",\"bytes_in\":");
    push_u64(out, rec.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    push_u64(out, rec.bytes_out);
    out.extend_from_slice(b",\"duration_us\":");
    push_u64(out, micros(rec.duration));
    out.extend_from_slice(b",\"upstream_duration_us\":");
    match rec.upstream {
        Some(d) => push_u64(out, micros(d)),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"retries\":");
    push_u64(out, rec.retries.into());
    out.extend_from_slice(b",\"request_id\":");
    push_json(out, rec.request_id);
    out.extend_from_slice(b",\"referer\":");
    push_json(out, rec.referer);
    out.extend_from_slice(b",\"user_agent\":");
    push_json(out, rec.user_agent);
    if !rec.tls_version.is_empty() {
        out.extend_from_slice(b",\"tls_version\":");
        push_json(out, rec.tls_version.as_bytes());
    }
    if !rec.alpn.is_empty() {
        out.extend_from_slice(b",\"alpn\":");
        push_json(out, rec.alpn.as_bytes());
    }
    if !rec.auth.is_empty() {
        out.extend_from_slice(b",\"auth\":");
        push_json(out, rec.auth.as_bytes());
    }
    out.extend_from_slice(b"}\n");
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Test records and a text-line reader, shared with the log's own tests.
#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::access_log::Protocol;
    use std::time::UNIX_EPOCH;

    pub(crate) fn record() -> Record<'static> {
        Record {
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            client: "203.0.113.7".parse().unwrap(),
            host: "chat.app.example.net",
            service: "chat",
            instance: "chat-1",
            method: "GET",
            path: "/a?b=1",
            protocol: Protocol::Http11,
            status: 200,
            bytes_in: 17,
            bytes_out: 1234,
            duration: Duration::from_micros(12_345),
            upstream: Some(Duration::from_micros(10_250)),
            retries: 1,
            request_id: b"4bf92f35",
            referer: b"https://example.net/",
            user_agent: b"curl/8.0",
            tls_version: "",
            alpn: "",
            auth: "",
        }
    }

    fn text(rec: &Record<'_>) -> String {
        let mut out = Vec::new();
        write_text(rec, &mut out);
        String::from_utf8(out).expect("text lines are ASCII")
    }

    fn json(rec: &Record<'_>) -> String {
        let mut out = Vec::new();
        write_json(rec, &mut out);
        String::from_utf8(out).expect("JSON lines are UTF-8")
    }

    #[test]
    fn text_line() {
        assert_eq!(
            text(&record()),
            "203.0.113.7 - - [14/Nov/2023:22:13:20 +0000] \"GET /a?b=1 HTTP/1.1\" 200 1234 \
             \"https://example.net/\" \"curl/8.0\" host=\"chat.app.example.net\" service=\"chat\" \
             instance=\"chat-1\" bytes_in=17 rt=0.012 urt=0.010 retries=1 rid=\"4bf92f35\"\n"
        );
    }

    #[test]
    fn json_line() {
        assert_eq!(
            json(&record()),
            "{\"time\":\"2023-11-14T22:13:20.123Z\",\"client\":\"203.0.113.7\",\
             \"host\":\"chat.app.example.net\",\"service\":\"chat\",\"instance\":\"chat-1\",\
             \"method\":\"GET\",\"path\":\"/a?b=1\",\"protocol\":\"HTTP/1.1\",\"status\":200,\
             \"bytes_in\":17,\"bytes_out\":1234,\"duration_us\":12345,\
             \"upstream_duration_us\":10250,\"retries\":1,\"request_id\":\"4bf92f35\",\
             \"referer\":\"https://example.net/\",\"user_agent\":\"curl/8.0\"}\n"
        );
    }

    #[test]
    fn tls_fields_only_on_tls() {
        let tls = Record {
            tls_version: "TLSv1.3",
            alpn: "h2",
            ..record()
        };
        let t = text(&tls);
        assert!(
            t.ends_with(" rid=\"4bf92f35\" tls=\"TLSv1.3\" alpn=\"h2\"\n"),
            "{t}"
        );
        assert_eq!(parse_text(&t).len(), 19, "{t}");
        let j = json(&tls);
        assert!(
            j.ends_with(
                ",\"user_agent\":\"curl/8.0\",\"tls_version\":\"TLSv1.3\",\"alpn\":\"h2\"}\n"
            ),
            "{j}"
        );
        // TLS without ALPN: the text field is there as `-`, the JSON key is not.
        let authed = Record {
            auth: "denied",
            ..tls
        };
        assert!(text(&authed).ends_with(" alpn=\"h2\" auth=\"denied\"\n"));
        assert!(json(&authed).ends_with(",\"alpn\":\"h2\",\"auth\":\"denied\"}\n"));
        let no_alpn = Record { alpn: "", ..tls };
        assert!(text(&no_alpn).ends_with(" tls=\"TLSv1.3\" alpn=\"-\"\n"));
        let v: serde_json::Value = serde_json::from_str(&json(&no_alpn)).unwrap();
        assert_eq!(v["tls_version"], "TLSv1.3");
        assert!(v.get("alpn").is_none(), "{v}");
        // Plain: neither, in either format (the lines above are the plain ones).
        assert!(!text(&record()).contains("tls="));
        assert!(!json(&record()).contains("tls_version"));
        // A base for callers that fill only some fields.
        let d = Record::default();
        assert_eq!((d.tls_version, d.alpn, d.status), ("", "", 0));
    }

    #[test]
    fn empty_fields_and_no_upstream() {
        let rec = Record {
            client: "2001:db8::1".parse().unwrap(),
            host: "",
            service: "",
            instance: "",
            protocol: Protocol::Http2,
            status: 404,
            bytes_in: 0,
            bytes_out: 0,
            upstream: None,
            retries: 0,
            request_id: b"",
            referer: b"",
            user_agent: b"",
            ..record()
        };
        assert_eq!(
            text(&rec),
            "2001:db8::1 - - [14/Nov/2023:22:13:20 +0000] \"GET /a?b=1 HTTP/2.0\" 404 0 \"-\" \"-\" \
             host=\"-\" service=\"-\" instance=\"-\" bytes_in=0 rt=0.012 urt=- retries=0 rid=\"-\"\n"
        );
        let v: serde_json::Value = serde_json::from_str(&json(&rec)).unwrap();
        assert_eq!(v["client"], "2001:db8::1");
        assert_eq!(v["host"], "");
        assert_eq!(v["user_agent"], "");
        assert_eq!(v["protocol"], "HTTP/2.0");
        assert!(v["upstream_duration_us"].is_null());
    }

    #[test]
    fn escaping() {
        let nasty: &[u8] = b"a\"b\\c\nd\x01\x7f \xc3\xa9 \xff\xfe end";
        let rec = Record {
            path: "/x\"y\\z",
            host: "h\tx",
            user_agent: nasty,
            referer: b"\"quoted\"",
            request_id: b"id \xe2\x80",
            ..record()
        };
        let t = text(&rec);
        assert!(t.is_ascii(), "{t}");
        assert_eq!(t.matches('\n').count(), 1, "{t}");
        assert!(t.contains(r#""GET /x\x22y\x5Cz HTTP/1.1""#), "{t}");
        assert!(
            t.contains(r#" "a\x22b\x5Cc\x0Ad\x01\x7F \xC3\xA9 \xFF\xFE end" "#),
            "{t}"
        );
        assert!(t.contains(r#" "\x22quoted\x22" "#), "{t}");
        assert!(t.contains(r#"host="h\x09x""#), "{t}");
        assert!(t.contains(r#"rid="id \xE2\x80""#), "{t}");

        let j = json(&rec);
        assert_eq!(j.matches('\n').count(), 1, "{j}");
        assert!(
            j.contains(r#""user_agent":"a\"b\\c\nd\u0001\u007f é \ufffd\ufffd end""#),
            "{j}"
        );
        assert!(j.contains(r#""path":"/x\"y\\z""#), "{j}");
        assert!(j.contains(r#""host":"h\tx""#), "{j}");
        assert!(j.contains(r#""request_id":"id \ufffd""#), "{j}");
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["user_agent"], String::from_utf8_lossy(nasty).as_ref());
        assert_eq!(v["referer"], "\"quoted\"");
    }

    /// Splits a text line into its tokens and unescapes the quoted ones, as a log reader
    /// would: `[...]` is one token, `"..."` ends at the first `"`, `\xHH` is one byte.
    pub(crate) fn parse_text(line: &str) -> Vec<Vec<u8>> {
        let b = line.trim_end_matches('\n').as_bytes();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b' ' => i += 1,
                b'[' => {
                    let end = i + b[i..].iter().position(|&c| c == b']').unwrap();
                    tokens.push(b[i + 1..end].to_vec());
                    i = end + 1;
                }
                _ => {
                    // key="..." or "..." or a bare token.
                    let mut tok = Vec::new();
                    while i < b.len() && b[i] != b' ' {
                        if b[i] == b'"' {
                            i += 1;
                            while b[i] != b'"' {
                                if b[i] == b'\\' {
                                    assert_eq!(b[i + 1], b'x', "only \\xHH escapes");
                                    let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
                                    tok.push(u8::from_str_radix(hex, 16).unwrap());
                                    i += 4;
                                } else {
                                    tok.push(b[i]);
                                    i += 1;
                                }
                            }
                            i += 1;
                        } else {
                            tok.push(b[i]);
                            i += 1;
                        }
                    }
                    tokens.push(tok);
                }
            }
        }
        tokens
    }

    #[test]
    fn text_and_json_parse_back() {
        let mut rng = fastrand::Rng::with_seed(7);
        let field = |rng: &mut fastrand::Rng| -> Vec<u8> {
            let n = rng.usize(1..24);
            let v: Vec<u8> = (0..n)
                .map(|_| match rng.u8(0..4) {
                    0 => rng.u8(..),
                    1 => *rng.choice(b"\"\\ \t\n[]=-").unwrap(),
                    _ => rng.u8(b'a'..=b'z'),
                })
                .collect();
            if v == b"-" {
                b"x".to_vec()
            } else {
                v
            }
        };
        for _ in 0..500 {
            let (referer, user_agent, request_id) =
                (field(&mut rng), field(&mut rng), field(&mut rng));
            let rec = Record {
                referer: &referer,
                user_agent: &user_agent,
                request_id: &request_id,
                ..record()
            };
            let line = text(&rec);
            let tokens = parse_text(&line);
            // addr - - time request status bytes referer ua host= service= instance= bytes_in= rt= urt= retries= rid=
            assert_eq!(tokens.len(), 17, "{line}");
            assert_eq!(tokens[7], referer, "{line}");
            assert_eq!(tokens[8], user_agent, "{line}");
            assert_eq!(
                tokens[16],
                [b"rid=".as_slice(), &request_id].concat(),
                "{line}"
            );

            let v: serde_json::Value = serde_json::from_str(&json(&rec)).unwrap();
            assert_eq!(v["referer"], String::from_utf8_lossy(&referer).as_ref());
            assert_eq!(
                v["user_agent"],
                String::from_utf8_lossy(&user_agent).as_ref()
            );
            assert_eq!(
                v["request_id"],
                String::from_utf8_lossy(&request_id).as_ref()
            );
        }
    }
}
