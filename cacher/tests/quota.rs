//! A staging whose copy would take the app's scope of the cache past its quota: the registry
//! refuses it with `DENIED` naming the quota, and keeps nothing of what it refused.

mod common;

use common::*;
use serde_json::json;

const KIB: usize = 1024;

#[test]
fn a_copy_past_the_apps_quota_is_refused_and_leaves_nothing_behind() {
    let upstream = Upstream::start(None);
    let berth = Berth::start_with_quotas("- {repositories: cache/*, max_bytes: 200KiB}\n");
    let image = Image::new(
        "amd64",
        vec![
            Layer::generate(31, 64 * KIB),
            Layer::generate(32, 300 * KIB),
        ],
        json!({ "Cmd": ["/app/run"] }),
    );
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let big = &image.layers[1].blob;

    let guid = new_guid();
    let cacher = Cacher::caching_into(&berth, "attempts: 1\n")
        .app(&guid)
        .env("BERTH_CACHE", "true");
    let reference = format!("{}/team/app:1.0", upstream.host());
    let outcome = cacher.run(&cacher.builder_args(&reference, &[]));
    // A failed copy fails the staging, or stages uncached where the cacher falls back: either
    // way the registry's refusal is what the staging log shows.
    let printed = format!("{}{}", outcome.stdout, outcome.stderr);
    assert!(
        printed.contains(&format!("quota \"cache/*\" exceeded: cache/{guid} holds ")),
        "{printed}"
    );
    assert!(
        matches!(outcome.code, Some(0 | 2)),
        "exit code {:?}: {printed}",
        outcome.code
    );

    let repo = cache_repository(&guid);
    assert!(!berth.has_blob(&repo, &big.digest));
    assert_eq!(berth.tags(&repo), Vec::<String>::new());
    assert_eq!(berth.manifest(&repo, &image.manifest.digest), None);
    let hex = &big.digest["sha256:".len()..];
    let stored: Vec<_> = files_below(&berth.root())
        .into_iter()
        .filter(|path| {
            path.file_name().is_some_and(|name| name == hex)
                || path.parent().is_some_and(|dir| dir.ends_with("uploads"))
        })
        .collect();
    assert!(stored.is_empty(), "left behind: {stored:?}");
}
