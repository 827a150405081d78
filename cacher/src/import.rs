//! `berth-cacher import`: pushes a `docker save` tarball or an OCI image layout (a directory, or a
//! tar, optionally gzipped) into a registry, streaming each blob out of the archive.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use berth_oci::manifest::{Descriptor, ManifestDocument};
use berth_oci::{Digest, DigestHasher, media_type};
use bytes::Bytes;
use clap::Parser;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::client::{
    ClientError, ClientOptions, Credentials, Manifest, RegistryClient, UploadStart,
};
use crate::progress::human_bytes;
use crate::reference::ImageReference;
use crate::secret::{self, Secret};

/// JSON documents (manifests, configs, indexes) up to this size are kept from the first pass.
const MAX_DOCUMENT: usize = 4 * 1024 * 1024;
const CHUNK: usize = 1024 * 1024;
const PASSWORD_ENV: &str = "BERTH_REGISTRY_PASSWORD";

#[derive(Debug, Parser)]
#[command(
    name = "berth-cacher import",
    about = "Push a docker save tarball or an OCI image layout into a registry"
)]
struct ImportArgs {
    /// `docker save` tarball, OCI layout directory, or OCI layout tar (optionally gzipped).
    file: PathBuf,
    /// Destination, e.g. `registry.internal:8080/team/app:1.0`.
    #[arg(long)]
    to: String,
    /// Accept any TLS certificate and fall back to plain HTTP.
    #[arg(long)]
    insecure: bool,
    /// Destination user; the password comes from BERTH_REGISTRY_PASSWORD or --password-stdin.
    #[arg(long)]
    username: Option<String>,
    #[arg(long)]
    password_stdin: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, io::Error),
    #[error("{0}")]
    Format(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
}

/// Runs `import` with its arguments; exit 1 for bad arguments, 2 when the import fails.
pub fn main(args: &[String]) -> ExitCode {
    let env_password = std::env::var(PASSWORD_ENV).ok();
    if let Err(err) = secret::scrub_process_memory(&[], &[PASSWORD_ENV]) {
        eprintln!("warning: could not scrub credentials from the process table: {err}");
    }
    let args = match ImportArgs::try_parse_from(
        std::iter::once("berth-cacher import".to_owned()).chain(args.iter().cloned()),
    ) {
        Ok(args) => args,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { 1 } else { 0 });
        }
    };
    let password = if args.password_stdin {
        let mut line = String::new();
        if io::stdin().lock().read_line(&mut line).is_err() {
            eprintln!("could not read the password from standard input");
            return ExitCode::from(1);
        }
        Some(Secret::from_line(line))
    } else {
        env_password.map(Secret::new)
    };
    let credentials = match (args.username.clone(), password) {
        (Some(username), Some(password)) => Some(Credentials { username, password }),
        (Some(_), None) => {
            eprintln!("--username needs a password in {PASSWORD_ENV} or on standard input");
            return ExitCode::from(1);
        }
        _ => None,
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match runtime.block_on(import(&args.file, &args.to, args.insecure, credentials)) {
        Ok(pinned) => {
            println!("Pushed {pinned}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("import failed: {err}");
            ExitCode::from(2)
        }
    }
}

/// Pushes the image in `file` to `to` and returns the digest-pinned reference.
pub async fn import(
    file: &Path,
    to: &str,
    insecure: bool,
    credentials: Option<Credentials>,
) -> Result<String, ImportError> {
    let dest_ref = ImageReference::parse(to)?;
    let scan = {
        let file = file.to_owned();
        tokio::task::spawn_blocking(move || Scan::read(&file))
            .await
            .expect("scan task")?
    };
    let plan = scan.plan()?;
    let options = ClientOptions {
        credentials,
        insecure,
        ..ClientOptions::default()
    };
    let client = Arc::new(RegistryClient::connect(dest_ref.api_host(), options).await?);
    let repo = &dest_ref.repository;

    let mut needed = HashMap::new();
    for (path, (digest, size)) in &plan.blobs {
        if client.blob_size(repo, digest).await?.is_some() {
            println!(
                "  {}  {:>10}  already present",
                &digest.hex()[..12],
                human_bytes(*size)
            );
        } else {
            needed.insert(path.clone(), (digest.clone(), *size));
        }
    }
    upload_from_archive(file, needed, &client, &dest_ref).await?;

    for manifest in &plan.manifests {
        client
            .put_manifest(repo, &manifest.digest.to_string(), manifest)
            .await?;
    }
    let top = plan.manifests.last().expect("a plan has a top manifest");
    if let Some(tag) = &dest_ref.tag {
        client.put_manifest(repo, tag.as_str(), top).await?;
    }
    Ok(format!("{}/{}@{}", dest_ref.registry, repo, top.digest))
}

/// Second pass: reads the archive again and streams each needed file into an upload, in
/// archive order (a tar can only be read front to back).
async fn upload_from_archive(
    file: &Path,
    mut needed: HashMap<String, (Digest, u64)>,
    client: &Arc<RegistryClient>,
    dest: &ImageReference,
) -> Result<(), ImportError> {
    if needed.is_empty() {
        return Ok(());
    }
    type Blob = (Digest, u64, mpsc::Receiver<io::Result<Bytes>>);
    let (blob_tx, mut blob_rx) = mpsc::channel::<Blob>(1);
    let wanted: HashMap<String, (Digest, u64)> = needed.clone();
    let path = file.to_owned();
    let reader = tokio::task::spawn_blocking(move || {
        for_each_file(
            &path,
            |name, reader| {
                let Some((digest, size)) = wanted.get(name) else {
                    return Ok(());
                };
                let (chunk_tx, chunk_rx) = mpsc::channel(4);
                if blob_tx
                    .blocking_send((digest.clone(), *size, chunk_rx))
                    .is_err()
                {
                    return Err(io::Error::other("the upload stopped"));
                }
                let mut buffer = vec![0u8; CHUNK];
                loop {
                    let read = reader.read(&mut buffer)?;
                    if read == 0 {
                        return Ok(());
                    }
                    let chunk = Bytes::copy_from_slice(&buffer[..read]);
                    if chunk_tx.blocking_send(Ok(chunk)).is_err() {
                        return Err(io::Error::other("the upload stopped"));
                    }
                }
            },
            |_, _| {},
        )
    });
    let mut uploaded = HashSet::new();
    let report = |digest: &Digest, size: u64, what: &str| {
        println!(
            "  {}  {:>10}  {what}",
            &digest.hex()[..12],
            human_bytes(size)
        );
    };
    while let Some((digest, size, mut chunks)) = blob_rx.recv().await {
        let start = if uploaded.insert(digest.clone()) {
            Some(client.start_upload(&dest.repository, Some(&digest)).await?)
        } else {
            None
        };
        match start {
            Some(UploadStart::Session(location)) => {
                let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(
                    chunks,
                    |mut rx| async { rx.recv().await.map(|chunk| (chunk, rx)) },
                ));
                client
                    .finish_upload(&dest.repository, location, &digest, size, body)
                    .await?;
                report(&digest, size, "pushed");
            }
            // Nothing to send (mounted, or a second path to a blob already sent), but the reader
            // hands the content over anyway, since a tar is read front to back: drain it, or the
            // reader takes the dropped channel for a failed upload.
            mounted => {
                while chunks.recv().await.is_some() {}
                if mounted.is_some() {
                    report(&digest, size, "mounted");
                }
            }
        }
    }
    reader
        .await
        .expect("archive reader task")
        .map_err(|e| ImportError::Read(file.to_owned(), e))?;
    needed.retain(|_, (digest, _)| !uploaded.contains(digest));
    match needed.keys().next() {
        Some(missing) => Err(ImportError::Format(format!(
            "{missing} is missing from the archive"
        ))),
        None => Ok(()),
    }
}

/// What the first pass learnt about one file of the archive.
#[derive(Debug, Clone)]
struct FileInfo {
    digest: Digest,
    size: u64,
    gzip: bool,
    /// The content, for small JSON documents.
    document: Option<Bytes>,
}

/// First pass: every file's digest and size, and the small JSON documents.
#[derive(Debug, Default)]
struct Scan {
    files: HashMap<String, FileInfo>,
    links: HashMap<String, String>,
}

/// What to push: blobs by archive path, then manifests children first, top last.
struct Plan {
    blobs: BTreeMap<String, (Digest, u64)>,
    manifests: Vec<Manifest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    layers: Vec<String>,
}

impl Scan {
    fn read(path: &Path) -> Result<Scan, ImportError> {
        let mut scan = Scan::default();
        let mut links = Vec::new();
        for_each_file(
            path,
            |name, reader| {
                scan.files.insert(name.to_owned(), inspect(reader)?);
                Ok(())
            },
            |name, target| links.push((name.to_owned(), target.to_owned())),
        )
        .map_err(|e| ImportError::Read(path.to_owned(), e))?;
        scan.links = links.into_iter().collect();
        Ok(scan)
    }

    /// Follows links (docker save shares identical layers by symlink) to a real file.
    fn resolve(&self, name: &str) -> Option<(&str, &FileInfo)> {
        let mut name = name.trim_start_matches("./");
        for _ in 0..8 {
            if let Some((key, info)) = self.files.get_key_value(name) {
                return Some((key.as_str(), info));
            }
            name = self.links.get(name)?;
        }
        None
    }

    fn document(&self, name: &str) -> Result<(&str, &FileInfo, &Bytes), ImportError> {
        let (path, info) = self
            .resolve(name)
            .ok_or_else(|| ImportError::Format(format!("{name} is missing from the archive")))?;
        let bytes = info.document.as_ref().ok_or_else(|| {
            ImportError::Format(format!("{name} is not a JSON document under 4 MiB"))
        })?;
        Ok((path, info, bytes))
    }

    fn plan(&self) -> Result<Plan, ImportError> {
        let mut plan = Plan {
            blobs: BTreeMap::new(),
            manifests: Vec::new(),
        };
        if self.resolve("index.json").is_some() {
            let (_, _, index) = self.document("index.json")?;
            let index: ManifestDocument = parse_json(index, "index.json")?;
            let top = index
                .manifests
                .iter()
                .flatten()
                .next()
                .ok_or_else(|| ImportError::Format("index.json lists no image".into()))?;
            self.plan_oci(top, &mut plan)?;
        } else if self.resolve("manifest.json").is_some() {
            self.plan_docker_save(&mut plan)?;
        } else {
            return Err(ImportError::Format(
                "neither an OCI image layout (index.json) nor a docker save archive (manifest.json)"
                    .into(),
            ));
        }
        Ok(plan)
    }

    fn plan_oci(&self, descriptor: &Descriptor, plan: &mut Plan) -> Result<(), ImportError> {
        let name = blob_path(&descriptor.digest);
        let (_, info, bytes) = self.document(&name)?;
        if info.digest != descriptor.digest {
            return Err(ImportError::Format(format!(
                "{name} does not match its digest"
            )));
        }
        let media_type = descriptor.media_type.clone().ok_or_else(|| {
            ImportError::Format(format!("the descriptor of {name} has no mediaType"))
        })?;
        let parts: ManifestDocument = parse_json(bytes, &name)?;
        if media_type::is_index(&media_type) {
            for child in parts.manifests.iter().flatten() {
                self.plan_oci(child, plan)?;
            }
        } else {
            for blob in parts.blobs() {
                let path = blob_path(&blob.digest);
                let (path, info) = self.resolve(&path).ok_or_else(|| {
                    ImportError::Format(format!("{path} is missing from the archive"))
                })?;
                if info.digest != blob.digest || info.size != blob.size {
                    return Err(ImportError::Format(format!(
                        "{path} does not match its descriptor"
                    )));
                }
                plan.blobs
                    .insert(path.to_owned(), (blob.digest.clone(), blob.size));
            }
        }
        plan.manifests.push(Manifest {
            media_type,
            bytes: bytes.clone(),
            digest: descriptor.digest.clone(),
        });
        Ok(())
    }

    /// A docker save archive holds an image config and uncompressed layer tars; the pushed image
    /// gets a new OCI manifest naming them.
    fn plan_docker_save(&self, plan: &mut Plan) -> Result<(), ImportError> {
        let (_, _, manifest) = self.document("manifest.json")?;
        let entries: Vec<DockerSaveEntry> = parse_json(manifest, "manifest.json")?;
        let entry = entries
            .first()
            .ok_or_else(|| ImportError::Format("manifest.json lists no image".into()))?;
        let (config_path, config, _) = self.document(&entry.config)?;
        plan.blobs
            .insert(config_path.to_owned(), (config.digest.clone(), config.size));
        let mut layers = Vec::new();
        for layer in &entry.layers {
            let (path, info) = self.resolve(layer).ok_or_else(|| {
                ImportError::Format(format!("{layer} is missing from the archive"))
            })?;
            plan.blobs
                .insert(path.to_owned(), (info.digest.clone(), info.size));
            let media_type = if info.gzip {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            } else {
                "application/vnd.oci.image.layer.v1.tar"
            };
            layers.push(json!({"mediaType": media_type, "digest": info.digest, "size": info.size}));
        }
        let bytes = Bytes::from(
            serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": media_type::OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config.digest,
                    "size": config.size,
                },
                "layers": layers,
            }))
            .expect("a manifest serialises"),
        );
        plan.manifests.push(Manifest {
            media_type: media_type::OCI_MANIFEST.to_owned(),
            digest: Digest::sha256_of(&bytes),
            bytes,
        });
        Ok(())
    }
}

fn blob_path(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex())
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], name: &str) -> Result<T, ImportError> {
    serde_json::from_slice(bytes).map_err(|e| ImportError::Format(format!("{name}: {e}")))
}

/// Hashes a file as it is read, keeping it when it looks like a small JSON document.
fn inspect(reader: &mut dyn Read) -> io::Result<FileInfo> {
    let mut hasher = DigestHasher::new(berth_oci::Algorithm::Sha256);
    let mut buffer = vec![0u8; CHUNK];
    let mut size = 0u64;
    let mut kept = Vec::new();
    let mut first = None;
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        let chunk = &buffer[..read];
        if first.is_none() {
            first = Some((chunk[0], chunk.get(1).copied()));
        }
        hasher.update(chunk);
        size += read as u64;
        let is_json = first.is_some_and(|(b, _)| b == b'{' || b == b'[');
        if is_json && size as usize <= MAX_DOCUMENT {
            kept.extend_from_slice(chunk);
        }
    }
    let json = first.is_some_and(|(b, _)| b == b'{' || b == b'[') && size as usize <= MAX_DOCUMENT;
    Ok(FileInfo {
        digest: hasher.finish(),
        size,
        gzip: first == Some((0x1f, Some(0x8b))),
        document: json.then(|| Bytes::from(kept)),
    })
}

/// Calls `file` for every regular file of a directory or a (gzipped) tar, with its path relative
/// to the root, and `link` for every link with its target resolved to such a path.
fn for_each_file(
    root: &Path,
    mut file: impl FnMut(&str, &mut dyn Read) -> io::Result<()>,
    mut link: impl FnMut(&str, &str),
) -> io::Result<()> {
    if root.is_dir() {
        return walk_dir(root, root, &mut file);
    }
    let mut input = BufReader::with_capacity(CHUNK, File::open(root)?);
    let gzip = input.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let input: Box<dyn Read> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(input))
    } else {
        Box::new(input)
    };
    let mut archive = tar::Archive::new(input);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let kind = entry.header().entry_type();
        if kind.is_file() {
            file(&path, &mut entry)?;
        } else if (kind.is_symlink() || kind.is_hard_link())
            && let Some(target) = entry.link_name()?
        {
            let target = target.to_string_lossy().into_owned();
            let resolved = if kind.is_symlink() {
                join_relative(&path, &target)
            } else {
                target.trim_start_matches("./").to_owned()
            };
            link(&path, &resolved);
        }
    }
    Ok(())
}

fn walk_dir(
    root: &Path,
    dir: &Path,
    file: &mut impl FnMut(&str, &mut dyn Read) -> io::Result<()>,
) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk_dir(root, &path, file)?;
        } else if path.is_file() {
            let name = path
                .strip_prefix(root)
                .expect("walked below the root")
                .to_string_lossy()
                .into_owned();
            file(&name, &mut File::open(&path)?)?;
        }
    }
    Ok(())
}

/// Resolves a symlink target written relative to the link's own directory.
fn join_relative(link: &str, target: &str) -> String {
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_targets_resolve_within_the_archive() {
        assert_eq!(
            join_relative("abc/layer.tar", "../def/layer.tar"),
            "def/layer.tar"
        );
        assert_eq!(join_relative("top", "blobs/x"), "blobs/x");
    }

    #[test]
    fn inspect_hashes_and_keeps_only_documents() {
        let doc = br#"{"a":1}"#;
        let info = inspect(&mut &doc[..]).unwrap();
        assert_eq!(info.digest, Digest::sha256_of(doc));
        assert_eq!(info.document.as_deref(), Some(&doc[..]));
        let layer = [0x1f, 0x8b, 0, 0];
        let info = inspect(&mut &layer[..]).unwrap();
        assert!(info.gzip && info.document.is_none());
        assert_eq!(info.size, 4);
    }
}
