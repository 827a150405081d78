//! Cloud Controller's flags: a missing `-dockerRef`, legacy and unknown flags.

use crate::common::*;
use crate::support::*;

#[test]
fn a_missing_docker_ref_is_a_flag_error() {
    let cacher = Cacher::new();
    let outcome = cacher.run(&[format!(
        "-outputMetadataJSONFilename={}",
        cacher.result_path().display()
    )]);
    outcome.expect_code(1);
    assert!(
        outcome
            .stderr
            .starts_with("missing flag: dockerRef required\n"),
        "{}",
        outcome.stderr
    );
    assert!(!outcome.stdout.contains("Staging process started"));
    assert!(!cacher.result_path().exists());
}

#[test]
fn legacy_and_unknown_flags_are_ignored_with_a_warning() {
    let upstream = Upstream::start(None);
    let image = web_image(8, &[64 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let reference = format!("{}/team/app:1.0", upstream.host());
    let cacher = Cacher::new();
    let outcome = cacher.run(&cacher.builder_args(
        &reference,
        &[
            "-cacheDockerImage",
            "-dockerRegistryHost=10.0.0.1",
            "-dockerRegistryPort",
            "8080",
            "--someFutureFlag=on",
        ],
    ));
    outcome.expect_code(0);
    let warnings: Vec<&str> = outcome
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(
        warnings,
        [
            "warning: ignoring legacy flag -cacheDockerImage",
            "warning: ignoring legacy flag -dockerRegistryHost",
            "warning: ignoring legacy flag -dockerRegistryPort",
            "warning: ignoring unknown flag -someFutureFlag",
        ]
    );
    assert_eq!(docker_image(&cacher.result()), reference);
}
