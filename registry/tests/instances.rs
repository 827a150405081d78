//! Several berth-registry instances over one object store and one database, behind Debian's nginx
//! balancing round robin with no affinity: every client works through it, a tag moved through one
//! instance is seen through another at once, a push survives an instance killed under it, a
//! database outage fails requests cleanly and heals without a restart, and every push that was
//! acknowledged survives all instances being killed at once. The stores are the test services'
//! SeaweedFS and PostgreSQL, and once the WebDAV blobstore and MariaDB. Also: blob GETs redirected
//! to URLs the store signs, and an instance's local copy of the blobs it served.

mod common;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

/// Instances sharing one content store and one database, each reached directly or through the
/// balancer; the database through a relay that can cut it off.
struct Cluster {
    registries: Vec<Registry>,
    balancer: Balancer,
    database: Outage,
    _metadata: SharedMetadata,
    _content: Box<dyn std::any::Any>,
    _dir: TempDir,
}

/// Which object store the cluster keeps its content in.
enum Store {
    S3,
    WebDav,
}

impl Cluster {
    fn start(instances: usize, store: Store, database: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (content, guard): (serde_norway::Value, Box<dyn std::any::Any>) = match store {
            Store::S3 => {
                let content = Content::s3(dir.path());
                (content.section().expect("an S3 section"), Box::new(content))
            }
            Store::WebDav => {
                let dav = berth_testkit::services::webdav();
                let password = dir.path().join("dav-password");
                std::fs::write(&password, &dav.password).expect("write the WebDAV password");
                let section = serde_norway::to_value(serde_json::json!({
                    "webdav": {"url": dav.url, "username": dav.username, "password_file": password}
                }))
                .expect("a WebDAV section");
                (section, Box::new(dav))
            }
        };
        let metadata = SharedMetadata::new(database, dir.path());
        let (section, relay) = through_relay(metadata.section());
        let mut yaml = with_storage("{}", "content", &content);
        yaml = with_storage(&yaml, "metadata", &section);
        let registries: Vec<Registry> = (0..instances)
            .map(|_| Registry::start_with_config(&yaml))
            .collect();
        let addrs: Vec<_> = registries.iter().map(Registry::addr).collect();
        Cluster {
            balancer: Balancer::start(&addrs),
            registries,
            database: relay,
            _metadata: metadata,
            _content: guard,
            _dir: dir,
        }
    }
}

/// The database section aimed at a relay in front of the database it names.
fn through_relay(section: &serde_norway::Value) -> (serde_norway::Value, Outage) {
    let mut section = section.clone();
    let (_, database) = section
        .as_mapping_mut()
        .and_then(|m| m.iter_mut().next())
        .expect("a database section");
    let host = database["host"].as_str().expect("a host").to_owned();
    let port = database["port"].as_u64().expect("a port");
    let target = format!("{host}:{port}")
        .parse()
        .expect("a database address");
    let relay = Outage::start(target);
    database["host"] = "127.0.0.1".into();
    database["port"] = relay.addr().port().into();
    (section, relay)
}

/// Writes `image` as an OCI layout under `dir` and pushes it to `host` as `repo:tag`; skopeo
/// retries what fails, as a client pushing through a balancer does.
fn push(dir: &Path, host: &str, repo: &str, tag: &str, image: &Image) -> std::process::Output {
    let layout = dir.join(format!("{}-{tag}", repo.replace('/', "-")));
    write_oci_layout(&layout, tag, &image.manifest, &image.blobs());
    run_output(
        skopeo()
            .args(["copy", "--retry-times", "5", "--dest-tls-verify=false"])
            .arg(oci_ref(&layout, tag))
            .arg(format!("docker://{host}/{repo}:{tag}")),
        Duration::from_secs(300),
    )
}

/// Pulls `repo:tag` from `host` with skopeo into a fresh layout and checks every blob against
/// `image`.
fn pull_and_verify(dir: &Path, host: &str, repo: &str, tag: &str, image: &Image) {
    let layout = dir.join(format!(
        "pulled-{}-{tag}-{}",
        repo.replace('/', "-"),
        rand_suffix()
    ));
    run(skopeo()
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{host}/{repo}:{tag}"))
        .arg(oci_ref(&layout, tag)));
    let (_, digest, _) = read_layout_ref(&layout, tag);
    assert_eq!(digest, image.manifest.digest, "{repo}:{tag} pulled whole");
    for blob in image.blobs() {
        assert_eq!(
            read_layout_blob(&layout, &blob.digest),
            blob.bytes,
            "blob {} of {repo}:{tag}",
            blob.digest
        );
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The digest each instance answers for `repo:reference`, asked directly.
async fn digests_everywhere(cluster: &Cluster, repo: &str, reference: &str) -> Vec<String> {
    let client = http_client();
    let mut digests = Vec::new();
    for registry in &cluster.registries {
        let fetched = get_manifest(&client, registry, repo, reference).await;
        assert_eq!(
            fetched.status,
            200,
            "{repo}:{reference} on {}",
            registry.host()
        );
        digests.push(fetched.digest.expect("a Docker-Content-Digest"));
    }
    digests
}

#[tokio::test]
async fn three_instances_serve_skopeo_docker_and_ctr_with_no_affinity() {
    let cluster = Cluster::start(3, Store::S3, "postgres");
    let dir = tempfile::tempdir().unwrap();
    let lb = cluster.balancer.host();

    // skopeo through the balancer: POST, PATCH and PUT land on different instances.
    let image = Image::generate(71, "amd64", &[3 << 20, 700 * 1024, 40 * 1024]);
    let pushed = push(dir.path(), &lb, "ha/skopeo", "v1", &image);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    pull_and_verify(dir.path(), &lb, "ha/skopeo", "v1", &image);
    assert_eq!(
        digests_everywhere(&cluster, "ha/skopeo", "v1").await,
        vec![image.manifest.digest.clone(); 3]
    );

    // A tag moved through one instance is what every other serves on the next request.
    let moved = Image::generate(72, "amd64", &[200 * 1024]);
    let first = cluster.registries[0].host();
    let out = push(dir.path(), &first, "ha/skopeo", "v1", &moved);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        digests_everywhere(&cluster, "ha/skopeo", "v1").await,
        vec![moved.manifest.digest.clone(); 3],
        "the tag moved through instance 0"
    );

    // docker pushes and pulls through the balancer.
    let dockerd = Dockerd::start(&lb);
    let archive = docker_archive(&cluster.registries[0], &image, "ha/local:v1");
    run(dockerd.docker().arg("load").arg("-i").arg(&archive));
    let remote = format!("{lb}/ha/docker:v1");
    let pushed = dockerd.tag_and_push("ha/local:v1", &remote);
    let docker_digest = digest_after(&pushed, "digest:").expect("docker push names a digest");
    dockerd.remove_all_images(&["ha/local:v1", &remote]);
    dockerd.pull_expecting(&remote, &docker_digest);

    // ctr pulls through the balancer.
    let containerd = Containerd::start();
    let reference = format!("{lb}/ha/skopeo:v1");
    run(&mut containerd.pull(&reference, &[]));
    assert_eq!(
        ctr_image_digest(&containerd, &reference),
        moved.manifest.digest
    );
}

#[tokio::test]
async fn a_push_completes_through_the_others_when_an_instance_is_killed_under_it() {
    let mut cluster = Cluster::start(3, Store::S3, "postgres");
    let dir = tempfile::tempdir().unwrap();
    let lb = cluster.balancer.host();
    let image = Image::generate(73, "amd64", &[48 << 20, 24 << 20, 1 << 20]);
    let pusher = thread::spawn({
        let (dir, lb, image) = (dir.path().to_owned(), lb.clone(), image.clone());
        move || push(&dir, &lb, "ha/killed", "v1", &image)
    });
    // Kill one instance while the layers stream through it.
    thread::sleep(Duration::from_millis(700));
    cluster.registries[1].kill_hard();
    let pushed = pusher.join().expect("the push thread");
    assert!(
        pushed.status.success(),
        "the client's retries finish through the other instances: {}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    pull_and_verify(dir.path(), &lb, "ha/killed", "v1", &image);
    // Nothing partial became visible: every blob either is whole or is not there at all.
    let client = http_client();
    for blob in image.blobs() {
        get_blob_checked(&client, &cluster.registries[0], "ha/killed", &blob.digest).await;
    }
    cluster.registries[1].restart();
    pull_and_verify(
        dir.path(),
        &cluster.registries[1].host(),
        "ha/killed",
        "v1",
        &image,
    );
}

#[tokio::test]
async fn a_database_outage_fails_requests_cleanly_and_heals_without_a_restart() {
    let cluster = Cluster::start(2, Store::S3, "postgres");
    let dir = tempfile::tempdir().unwrap();
    let lb = cluster.balancer.host();
    let image = Image::generate(74, "amd64", &[100 * 1024]);
    let out = push(dir.path(), &lb, "ha/outage", "v1", &image);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let client = http_client();
    let url = format!("{}/v2/ha/outage/manifests/v1", cluster.balancer.url());
    let get = async || {
        let response = client
            .get(&url)
            .header("Accept", MANIFEST_ACCEPT)
            .send()
            .await
            .expect("the balancer answers");
        let status = response.status().as_u16();
        (status, response.bytes().await.unwrap_or_default())
    };
    assert_eq!(get().await.0, 200);

    cluster.database.cut();
    let cut_at = Instant::now();
    let (mut served, mut failed) = (0, 0);
    while cut_at.elapsed() < Duration::from_secs(5) {
        let (status, body) = get().await;
        match status {
            200 => served += 1,
            500..=599 => {
                let json: serde_json::Value = serde_json::from_slice(&body)
                    .unwrap_or_else(|_| panic!("a {status} without the OCI error JSON: {body:?}"));
                assert!(json["errors"][0]["code"].is_string(), "{json}");
                failed += 1;
            }
            other => panic!("{other} during the outage: {body:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        failed > 0,
        "requests during the outage failed ({served} served)"
    );
    let health = client
        .get(format!("{}/healthz", cluster.registries[0].url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 503, "health names the outage");

    cluster.database.restore();
    let healed = Instant::now();
    loop {
        if get().await.0 == 200 && get().await.0 == 200 {
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(15),
            "the instances did not recover without a restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for registry in &cluster.registries {
        let health = client
            .get(format!("{}/healthz", registry.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
    }
    let again = Image::generate(75, "amd64", &[50 * 1024]);
    let out = push(dir.path(), &lb, "ha/outage", "v2", &again);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pull_and_verify(dir.path(), &lb, "ha/outage", "v2", &again);
}

#[tokio::test]
async fn every_acknowledged_push_survives_killing_every_instance() {
    let mut cluster = Cluster::start(3, Store::S3, "postgres");
    let dir = tempfile::tempdir().unwrap();
    let lb = cluster.balancer.host();
    let images: Vec<Image> = (0..6)
        .map(|i| Image::generate(80 + i, "amd64", &[(2 + i as usize) << 20, 300 * 1024]))
        .collect();
    let pushers: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let (dir, lb, image) = (dir.path().to_owned(), lb.clone(), image.clone());
            thread::spawn(move || {
                // No retries: a push either was acknowledged before the crash or was not.
                let layout = dir.join(format!("crash-{i}"));
                write_oci_layout(&layout, "v1", &image.manifest, &image.blobs());
                run_output(
                    skopeo()
                        .args(["copy", "--dest-tls-verify=false"])
                        .arg(oci_ref(&layout, "v1"))
                        .arg(format!("docker://{lb}/ha/crash-{i}:v1")),
                    Duration::from_secs(120),
                )
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(1500));
    for registry in &mut cluster.registries {
        registry.kill_hard();
    }
    let acknowledged: Vec<usize> = pushers
        .into_iter()
        .enumerate()
        .filter_map(|(i, pusher)| pusher.join().unwrap().status.success().then_some(i))
        .collect();
    for registry in &mut cluster.registries {
        registry.restart();
    }
    cluster.balancer.wait_ready();
    for i in &acknowledged {
        pull_and_verify(dir.path(), &lb, &format!("ha/crash-{i}"), "v1", &images[*i]);
    }
    // The others may be anywhere between nothing and complete, but never served broken.
    let client = http_client();
    for (i, image) in images.iter().enumerate() {
        if acknowledged.contains(&i) {
            continue;
        }
        let fetched = get_manifest(
            &client,
            &cluster.registries[0],
            &format!("ha/crash-{i}"),
            "v1",
        )
        .await;
        if fetched.status == 200 {
            pull_and_verify(dir.path(), &lb, &format!("ha/crash-{i}"), "v1", image);
        } else {
            assert_eq!(fetched.status, 404);
        }
    }
    eprintln!(
        "{} of {} pushes were acknowledged before every instance was killed",
        acknowledged.len(),
        images.len()
    );
}

#[tokio::test]
async fn instances_share_the_webdav_blobstore_and_mariadb() {
    let cluster = Cluster::start(2, Store::WebDav, "mysql");
    let dir = tempfile::tempdir().unwrap();
    let lb = cluster.balancer.host();
    let image = Image::generate(90, "amd64", &[2 << 20, 400 * 1024]);
    let out = push(dir.path(), &lb, "ha/dav", "v1", &image);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pull_and_verify(dir.path(), &lb, "ha/dav", "v1", &image);
    let moved = Image::generate(91, "amd64", &[100 * 1024]);
    let out = push(
        dir.path(),
        &cluster.registries[1].host(),
        "ha/dav",
        "v1",
        &moved,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        digests_everywhere(&cluster, "ha/dav", "v1").await,
        vec![moved.manifest.digest.clone(); 2]
    );
}

#[tokio::test]
async fn blob_redirects_send_clients_to_the_store_with_credentials_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = berth_testkit::services::s3_bucket();
    // No key in the configuration: AWS's standard environment variables supply it.
    let yaml = format!(
        "storage:\n  redirect_seconds: 600\n  content:\n    s3:\n      bucket: {}\n      endpoint: {}\n      \
         region: {}\n      path_style: true\n      prefix: {}\n",
        bucket.bucket, bucket.endpoint, bucket.region, bucket.prefix
    );
    let registry = Registry::start_configured(
        &yaml,
        &[
            ("AWS_ACCESS_KEY_ID", &bucket.access_key_id),
            ("AWS_SECRET_ACCESS_KEY", &bucket.secret_access_key),
        ],
    );
    let image = Image::generate(95, "amd64", &[1 << 20, 64 * 1024]);
    let out = push(dir.path(), &registry.host(), "ha/redirect", "v1", &image);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let layer = &image.layers[0].blob;
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = format!("{}/v2/ha/redirect/blobs/{}", registry.url(), layer.digest);
    let answer = no_follow.get(&url).send().await.unwrap();
    assert_eq!(answer.status(), 307);
    let location = answer.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with(&bucket.endpoint) && location.contains("X-Amz-Signature="),
        "a presigned URL of the store: {location}"
    );
    // The store serves the bytes, ranges included, to a client holding nothing but the URL.
    let whole = reqwest::get(&location).await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(sha256(&whole.bytes().await.unwrap()), layer.digest);
    let range = no_follow
        .get(&location)
        .header("Range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(range.status(), 206);
    assert_eq!(&range.bytes().await.unwrap()[..], &layer.bytes[10..20]);
    // HEAD still answers here, and clients that follow redirects pull the image whole.
    assert_eq!(head_status(&no_follow, &url).await, 200);
    pull_and_verify(dir.path(), &registry.host(), "ha/redirect", "v1", &image);
    let containerd = Containerd::start();
    let reference = format!("{}/ha/redirect:v1", registry.host());
    run(&mut containerd.pull(&reference, &[]));
    assert_eq!(
        ctr_image_digest(&containerd, &reference),
        image.manifest.digest
    );
}

#[test]
fn an_instance_serves_blobs_it_read_before_from_its_local_copy() {
    let dir = tempfile::tempdir().unwrap();
    let content = Content::s3(dir.path());
    let metadata = SharedMetadata::new("postgres", dir.path());
    let mut yaml = with_storage("{}", "content", &content.section().expect("an S3 section"));
    yaml = with_storage(&yaml, "metadata", metadata.section());
    let cached =
        Registry::start_with_config(&yaml.replace("storage:", "storage:\n  blob_cache: 64MiB"));
    let uncached = Registry::start_with_config(&yaml);
    let image = Image::generate(96, "amd64", &[3 << 20, 700 * 1024]);
    let out = push(dir.path(), &uncached.host(), "ha/local", "v1", &image);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pull_and_verify(dir.path(), &cached.host(), "ha/local", "v1", &image);

    // The layers vanish from the store underneath both instances (as if an operator had deleted
    // them): the one that served them before still does, from its own disk; the other cannot.
    let Content::S3 { bucket, .. } = &content else {
        unreachable!("an S3 store")
    };
    let layers: Vec<&str> = image
        .layers
        .iter()
        .map(|l| l.blob.digest.as_str())
        .collect();
    let stored = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(content.stored(dir.path(), "blobs"));
    let mut deleted = 0;
    for name in stored {
        let name = name.to_string_lossy();
        if layers
            .iter()
            .any(|digest| name.contains(digest.trim_start_matches("sha256:")))
        {
            let (status, body) = bucket.request("DELETE", Some(&format!("blobs/{name}")), b"");
            assert_eq!(status, 204, "{body}");
            deleted += 1;
        }
    }
    assert_eq!(deleted, layers.len());
    pull_and_verify(dir.path(), &cached.host(), "ha/local", "v1", &image);
    let metrics = blocking_get(cached.addr(), "/metrics", Duration::from_secs(10)).unwrap();
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    let hits: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("berth_registry_blob_cache_hits_total "))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no hit count in {metrics}"));
    assert!(hits >= layers.len() as f64, "{metrics}");
    let layer = layers[0];
    let reply = blocking_get(
        uncached.addr(),
        &format!("/v2/ha/local/blobs/{layer}"),
        Duration::from_secs(30),
    )
    .expect("the other instance answers");
    assert_ne!(
        reply.status, 200,
        "the uncached instance read its layer from the store"
    );
}
