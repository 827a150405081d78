//! End-to-end `berth-cacher import`: OCI image layouts (directory, tar, tar.gz) and a real
//! `docker save` archive pushed into berth-registry, then pulled back with skopeo.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;

use common::*;
use serde_json::json;

/// Imports `file` as `to`; returns the digest-pinned reference the cacher reports and what it
/// said about each blob (`pushed`, `mounted`, `already present`).
fn import(file: &Path, to: &str) -> (String, Vec<String>) {
    let cacher = Cacher::new();
    let outcome = cacher.run(&[
        "import".into(),
        file.display().to_string(),
        "--to".into(),
        to.into(),
        "--insecure".into(),
    ]);
    outcome.expect_code(0);
    let pushed = outcome
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Pushed "))
        .unwrap_or_else(|| panic!("no Pushed line in {}", outcome.stdout));
    // Blob lines: "  <12 hex>  <size>  <what happened>".
    let blobs = outcome
        .stdout
        .lines()
        .filter(|l| l.starts_with("  "))
        .map(|l| l.split("  ").last().unwrap_or_default().to_owned())
        .collect();
    (pushed.to_owned(), blobs)
}

#[test]
fn imports_oci_layouts_and_docker_save_archives() {
    let berth = Berth::start();
    let work = tempfile::tempdir().expect("a temporary directory");
    let image = Image::new(
        "amd64",
        vec![
            Layer::generate(80, 400 * 1024),
            Layer::generate(81, 200 * 1024),
        ],
        json!({ "Cmd": ["/imported"] }),
    );
    let layout = work.path().join("layout");
    write_oci_layout(&layout, "1", &image.manifest, &image.blobs());
    let tar = {
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_dir_all(".", &layout)
            .expect("tar the layout");
        builder.into_inner().expect("finish the tar")
    };
    let tar_path = work.path().join("layout.tar");
    fs::write(&tar_path, &tar).expect("write the tar");
    let tgz_path = work.path().join("layout.tar.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    fs::write(&tgz_path, gz.finish().expect("gzip")).expect("write the tar.gz");

    // Each into a repository of its own: the later ones find the blobs elsewhere in the
    // registry and mount them; the last finds them all in place already.
    for (file, repo, blobs) in [
        (&layout, "imported/dir", "pushed"),
        (&tar_path, "imported/tar", "mounted"),
        (&tgz_path, "imported/targz", "mounted"),
        (&layout, "imported/dir", "already present"),
    ] {
        let target = format!("{}/{repo}:1", berth.host());
        assert_eq!(
            import(file, &target),
            (
                berth.pinned(repo, &image.manifest.digest),
                vec![blobs.to_owned(); 3]
            ),
            "import of {}",
            file.display()
        );
        let (digest, manifest) = skopeo_pull(&target, work.path());
        assert_eq!(digest, image.manifest.digest);
        assert_eq!(manifest_layers(&manifest), image.layer_digests());
    }

    // A real `docker save`: uncompressed layers, which the pushed manifest names by diff_id.
    let dockerd = Dockerd::start(&berth.host());
    let archive = work.path().join("for-docker-load.tar");
    run(skopeo()
        .arg("copy")
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!("docker-archive:{}:e2e/local:1", archive.display())));
    run(dockerd.docker().arg("load").arg("-i").arg(&archive));
    let saved = work.path().join("saved.tar");
    run(dockerd
        .docker()
        .arg("save")
        .arg("-o")
        .arg(&saved)
        .arg("e2e/local:1"));
    let target = format!("{}/imported/saved:1", berth.host());
    let (pushed, _) = import(&saved, &target);
    let (digest, manifest) = skopeo_pull(&target, work.path());
    assert_eq!(pushed, berth.pinned("imported/saved", &digest));
    assert_eq!(manifest["config"]["digest"], image.config.digest.as_str());
    let diff_ids: Vec<String> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
    assert_eq!(manifest_layers(&manifest), diff_ids);
}
