//! Timestamps for the log lines, formatted once per second per thread.

use std::time::{SystemTime, UNIX_EPOCH};

/// The formatted second, cached per thread: formatting a line reads no clock and makes no
/// syscall; a new second costs one date computation.
#[derive(Clone, Copy)]
pub(super) struct Stamp {
    /// Seconds since the epoch.
    secs: u64,
    /// `22/Nov/2026:10:00:00 +0000`
    pub(super) clf: [u8; 26],
    /// `2026-11-22T10:00:00`
    pub(super) iso: [u8; 19],
}

thread_local! {
    static STAMP: std::cell::Cell<Stamp> = const {
        std::cell::Cell::new(Stamp { secs: u64::MAX, clf: [0; 26], iso: [0; 19] })
    };
}

/// The latest second formatting supports: 9999-12-31T23:59:59Z.
const MAX_SECS: u64 = 253_402_300_799;

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// Seconds and milliseconds since the epoch, clamped to what the formats can show.
pub(super) fn epoch(time: SystemTime) -> (u64, u32) {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) if d.as_secs() <= MAX_SECS => (d.as_secs(), d.subsec_millis()),
        Ok(_) => (MAX_SECS, 999),
        Err(_) => (0, 0),
    }
}

pub(super) fn stamp(secs: u64) -> Stamp {
    STAMP.with(|cell| {
        let s = cell.get();
        if s.secs == secs {
            return s;
        }
        let s = Stamp::new(secs);
        cell.set(s);
        s
    })
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil(days: u64) -> (u64, usize, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month as usize, day)
}

fn put2(out: &mut [u8], n: u64) {
    out[0] = b'0' + (n / 10 % 10) as u8;
    out[1] = b'0' + (n % 10) as u8;
}

fn put4(out: &mut [u8], n: u64) {
    put2(&mut out[..2], n / 100);
    put2(&mut out[2..4], n % 100);
}

impl Stamp {
    fn new(secs: u64) -> Self {
        let (year, month, day) = civil(secs / 86_400);
        let t = secs % 86_400;
        let (h, m, s) = (t / 3600, t / 60 % 60, t % 60);
        let mut clf = *b"00/Jan/0000:00:00:00 +0000";
        put2(&mut clf[0..2], day);
        clf[3..6].copy_from_slice(MONTHS[month - 1]);
        put4(&mut clf[7..11], year);
        put2(&mut clf[12..14], h);
        put2(&mut clf[15..17], m);
        put2(&mut clf[18..20], s);
        let mut iso = *b"0000-00-00T00:00:00";
        put4(&mut iso[0..4], year);
        put2(&mut iso[5..7], month as u64);
        put2(&mut iso[8..10], day);
        put2(&mut iso[11..13], h);
        put2(&mut iso[14..16], m);
        put2(&mut iso[17..19], s);
        Stamp { secs, clf, iso }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        for (secs, clf, iso) in [
            (0, "01/Jan/1970:00:00:00 +0000", "1970-01-01T00:00:00"),
            (
                951_782_400,
                "29/Feb/2000:00:00:00 +0000",
                "2000-02-29T00:00:00",
            ),
            (
                1_709_251_199,
                "29/Feb/2024:23:59:59 +0000",
                "2024-02-29T23:59:59",
            ),
            (
                1_700_000_000,
                "14/Nov/2023:22:13:20 +0000",
                "2023-11-14T22:13:20",
            ),
            (
                MAX_SECS,
                "31/Dec/9999:23:59:59 +0000",
                "9999-12-31T23:59:59",
            ),
        ] {
            let s = Stamp::new(secs);
            assert_eq!(std::str::from_utf8(&s.clf).unwrap(), clf);
            assert_eq!(std::str::from_utf8(&s.iso).unwrap(), iso);
            // Through the cache too, twice.
            assert_eq!(stamp(secs).clf, s.clf);
            assert_eq!(stamp(secs).iso, s.iso);
        }
        assert_eq!(epoch(UNIX_EPOCH - Duration::from_secs(5)), (0, 0));
        assert_eq!(
            epoch(UNIX_EPOCH + Duration::from_secs(MAX_SECS + 1)),
            (MAX_SECS, 999)
        );
    }
}
