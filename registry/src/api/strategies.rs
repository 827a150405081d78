//! Generators of request input for the property tests of the parsers in this module: text near
//! each grammar, where the edge cases are, mixed with arbitrary bytes and Unicode.

use axum::http::HeaderValue;
use proptest::prelude::*;

/// Cases per property: enough to reach the corners of each grammar, few enough for seconds in a
/// debug build.
pub(super) const CASES: u32 = 100_000;

/// A decimal number as a client might write one: small, anywhere in `u64`, just past it, signed,
/// padded or missing.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => (0u64..1000).prop_map(|n| n.to_string()),
        1 => Just("0".to_owned()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        2 => (0u64..3).prop_map(|n| (u64::MAX - n).to_string()),
        1 => Just("18446744073709551616".to_owned()),
        1 => Just(String::new()),
        1 => "[ +-]?[0-9]{0,25} ?",
    ]
}

/// A byte range as in `Range` or `Content-Range`, with the units, separators and suffixes
/// clients write and some they should not.
pub(super) fn range_text() -> impl Strategy<Value = String> {
    let ranged = (
        prop_oneof![
            Just(""),
            Just("bytes="),
            Just("bytes "),
            Just("bytes= "),
            Just("BYTES=")
        ],
        number(),
        prop_oneof![Just("-"), Just("--"), Just(" - "), Just("")],
        number(),
        prop_oneof![
            Just(""),
            Just("/*"),
            Just("/100"),
            Just(",0-1"),
            Just(", -5")
        ],
    )
        .prop_map(|(unit, start, dash, end, rest)| format!("{unit}{start}{dash}{end}{rest}"));
    prop_oneof![4 => ranged, 1 => any::<String>()]
}

/// Any value a header can carry: visible ASCII and obs-text, as HTTP parsers let through.
pub(super) fn header_value(
    near: impl Strategy<Value = String>,
) -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        4 => near.prop_map(Vec::from),
        1 => prop::collection::vec(any::<u8>(), 0..80),
    ]
    .prop_filter_map("not a header value", |bytes| {
        HeaderValue::from_bytes(&bytes).ok()
    })
}
