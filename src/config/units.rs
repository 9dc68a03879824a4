//! Human-readable sizes and durations: `"512M"`, `"1.5G"`, `"4096"`, `"500ms"`, `"2s"`.
//!
//! Owns the parsing and formatting of the unit strings used in config files and on the
//! command line. Pure string work: no files, no syscalls, no knowledge of config keys (the
//! caller adds the key and file to an error; these functions only give the reason).
//!
//! Sizes are binary (K = 1024). A fractional size must come out to a whole number of bytes
//! (`"1.5K"` is 1536, `"0.1K"` is an error). Durations need a unit.

use std::time::Duration;

/// What a size string looks like; appended to every size error.
pub(crate) const SIZE_HINT: &str = "expected a number with optional K/M/G/T suffix, e.g. 512M";
/// What a duration string looks like; appended to every duration error.
pub(crate) const DURATION_HINT: &str =
    "expected a number with unit ns/us/ms/s/m/h, e.g. 500ms or 2s";

/// Parses a byte size: a decimal number (optionally with a fraction) and an optional binary
/// suffix `K`, `M`, `G`, `T` (case-insensitive, optionally followed by `B` or `iB`), e.g.
/// `"512M"`, `"1.5G"`, `"4096"`, `"64K"`, `"2GiB"`. Spaces between number and suffix are allowed.
///
/// The error is the reason only, e.g. `invalid size "12Q" (expected a number ...)`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size_hinted(s, SIZE_HINT)
}

/// [`parse_size`] with the hint to put in parentheses after the reason.
fn parse_size_hinted(s: &str, hint: &str) -> Result<u64, String> {
    let invalid = |why: &str| -> String {
        if why.is_empty() {
            format!("invalid size \"{s}\" ({hint})")
        } else {
            format!("invalid size \"{s}\": {why} ({hint})")
        }
    };
    let t = s.trim();
    let num_len = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(num_len);
    let shift: u32 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(invalid("")),
    };
    let (int_part, frac_part) = split_decimal(num).ok_or_else(|| invalid(""))?;
    let multiplier = 1u128 << shift;
    let int_val: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| invalid("number too large"))?
    };
    let mut bytes = int_val
        .checked_mul(multiplier)
        .ok_or_else(|| invalid("number too large"))?;
    if !frac_part.is_empty() {
        if frac_part.len() > 18 {
            return Err(invalid("too many decimal places"));
        }
        let frac_val: u128 = frac_part.parse().map_err(|_| invalid(""))?;
        let denom = 10u128.pow(frac_part.len() as u32);
        let scaled = frac_val * multiplier;
        if scaled % denom != 0 {
            return Err(invalid("not a whole number of bytes"));
        }
        bytes += scaled / denom;
    }
    u64::try_from(bytes).map_err(|_| invalid("number too large"))
}

/// Like [`parse_size`], but `"none"` (any case) means no limit and gives `None`.
pub fn parse_optional_size(s: &str) -> Result<Option<u64>, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        Ok(None)
    } else {
        parse_size_hinted(s, &format!("{SIZE_HINT}, or \"none\"")).map(Some)
    }
}

/// Parses a duration: a decimal number (optionally with a fraction) and a unit `ns`, `us`
/// (or `µs`), `ms`, `s`, `m` (or `min`), `h`, e.g. `"500ms"`, `"2s"`, `"100us"`, `"1.5s"`.
/// A bare number is an error: the unit is never guessed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let invalid = |why: &str| -> String {
        if why.is_empty() {
            format!("invalid duration \"{s}\" ({DURATION_HINT})")
        } else {
            format!("invalid duration \"{s}\": {why} ({DURATION_HINT})")
        }
    };
    let t = s.trim();
    let num_len = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(num_len);
    let nanos_per_unit: u128 = match unit.trim() {
        "" => return Err(invalid("missing unit")),
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" | "min" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        _ => return Err(invalid("")),
    };
    let (int_part, frac_part) = split_decimal(num).ok_or_else(|| invalid(""))?;
    let int_val: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| invalid("number too large"))?
    };
    let mut nanos = int_val
        .checked_mul(nanos_per_unit)
        .ok_or_else(|| invalid("number too large"))?;
    if !frac_part.is_empty() {
        if frac_part.len() > 18 {
            return Err(invalid("too many decimal places"));
        }
        let frac_val: u128 = frac_part.parse().map_err(|_| invalid(""))?;
        // Sub-nanosecond remainders are dropped.
        nanos += frac_val * nanos_per_unit / 10u128.pow(frac_part.len() as u32);
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| invalid("number too large"))?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// Splits `"12.5"` into `("12", "5")`; `None` unless it is digits with at most one dot and at
/// least one digit.
fn split_decimal(num: &str) -> Option<(&str, &str)> {
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int_part.is_empty() && frac_part.is_empty())
        || !all_digits(int_part)
        || !all_digits(frac_part)
    {
        return None;
    }
    Some((int_part, frac_part))
}

/// Formats a byte count with the largest binary suffix that divides it exactly
/// (`536870912` → `"512M"`, `65536` → `"64K"`, `1536` → `"1536"`).
/// The result parses back to the same value with [`parse_size`].
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(40u32, "T"), (30, "G"), (20, "M"), (10, "K")] {
        let unit = 1u64 << shift;
        if bytes != 0 && bytes % unit == 0 {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// Formats a duration with the largest unit that represents it exactly (`2s`, `500ms`,
/// `100us`, `7ns`). The result parses back to the same value with [`parse_duration`].
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    for (unit_nanos, suffix) in [
        (3_600_000_000_000u128, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
    ] {
        if nanos != 0 && nanos % unit_nanos == 0 {
            return format!("{}{suffix}", nanos / unit_nanos);
        }
    }
    format!("{nanos}ns")
}
