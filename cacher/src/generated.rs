//! Generated input for the parsers' property tests: documents made of the pieces the parsers look
//! for, so that cases reach past the first check, then damaged the way a broken or hostile peer
//! damages them.

use proptest::prelude::*;
use serde_json::Value;

/// Cases per parser: enough to cover the combinations of pieces, few enough for a debug build to
/// run each property in seconds.
pub(crate) const CASES: u32 = 100_000;

/// Strings a parser might treat specially: digests (valid or nearly), media types, ports.
fn interesting_string() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,12}",
        "sha256:[0-9a-f]{64}",
        "sha(256|512):[0-9a-fA-F]{0,70}",
        prop::sample::select(
            &[
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.index.v1+json",
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.distribution.manifest.list.v2+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                "linux",
                "amd64",
                "80/tcp",
                "65536/udp",
            ][..]
        )
        .prop_map(str::to_owned),
    ]
}

/// JSON values whose objects use `keys`, nested a few levels.
pub(crate) fn json_value(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        interesting_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(keys), inner, 0..7).prop_map(
                |fields| {
                    Value::Object(
                        fields
                            .into_iter()
                            .map(|(key, value)| (key.to_owned(), value))
                            .collect(),
                    )
                }
            ),
        ]
    })
}

/// `value` serialised, then left whole, cut short, with a byte replaced or a byte inserted.
pub(crate) fn damaged_json(value: impl Strategy<Value = Value>) -> impl Strategy<Value = Vec<u8>> {
    (value, 0..4u8, any::<prop::sample::Index>(), any::<u8>()).prop_map(
        |(value, damage, at, byte)| {
            let mut bytes = serde_json::to_vec(&value).expect("a JSON value serialises");
            let at = at.index(bytes.len() + 1);
            match damage {
                0 => {}
                1 => bytes.truncate(at),
                2 if at < bytes.len() => bytes[at] = byte,
                _ => bytes.insert(at, byte),
            }
            bytes
        },
    )
}

/// Strings made of `pieces` and of arbitrary characters.
pub(crate) fn text_of(pieces: &'static [&'static str]) -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => prop::sample::select(pieces).prop_map(str::to_owned),
        1 => "[a-z0-9]{1,8}",
        1 => any::<char>().prop_map(String::from),
    ];
    prop_oneof![
        4 => prop::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat()),
        1 => any::<String>(),
    ]
}
