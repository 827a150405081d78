//! CNCF distribution (`docker-registry`) as the registry an app's image lives in: the stand-in the
//! registry's tests share, and how these tests publish images to it.

pub use berth_testkit::upstream::Distribution as Upstream;

use super::*;

pub trait Publish {
    /// Pushes `top` (an image manifest or an index) and `blobs` below it as `repo_tag` with
    /// skopeo, as a developer would push their app's image.
    fn push(&self, repo_tag: &str, top: &Blob, blobs: &[&Blob]);
}

impl Publish for Upstream {
    fn push(&self, repo_tag: &str, top: &Blob, blobs: &[&Blob]) {
        let layout = self
            .scratch()
            .join(format!("layout-{}", uuid::Uuid::new_v4().simple()));
        write_oci_layout(&layout, "v1", top, blobs);
        let all: &[&str] = if top.media_type == OCI_INDEX {
            &["--all"]
        } else {
            &[]
        };
        self.push_layout(&layout, "v1", repo_tag, all);
    }
}
