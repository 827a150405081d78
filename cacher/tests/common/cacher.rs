//! The cacher binary as Cloud Controller starts it, and the names it must give an app's cache.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

use super::*;

/// The key the tests configure, so they can predict each app's repository.
pub const REPOSITORY_KEY: &str = "00112233445566778899aabbccddeeff";

/// The cacher binary as Cloud Controller starts it, with a directory of its own for the result
/// file, its configuration and its TMPDIR. The environment is exactly what the test sets.
pub struct Cacher {
    dir: TempDir,
    env: Vec<(String, String)>,
}

/// How a run of the cacher ended.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    fn from_output(output: Output) -> Outcome {
        Outcome {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Panics, showing everything printed, unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Outcome {
        assert_eq!(
            self.code,
            Some(code),
            "berth-cacher exit code\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

impl Cacher {
    /// Without a cacher configuration: the plain builder.
    pub fn new() -> Cacher {
        let dir = tempfile::Builder::new()
            .prefix("cacher-")
            .tempdir()
            .expect("a temporary directory");
        for sub in ["tmp", "certs"] {
            fs::create_dir(dir.path().join(sub)).expect("create a directory");
        }
        Cacher {
            dir,
            env: Vec::new(),
        }
    }

    /// Configured to cache into `berth` under [`REPOSITORY_KEY`]; `extra` is more YAML.
    pub fn caching_into(berth: &Berth, extra: &str) -> Cacher {
        Cacher::configured(berth, "", extra)
    }

    /// Configured to cache into `berth` (serving HTTPS with the certificate `ca_file`) with the
    /// instance identity `identity` and no password, as the BOSH job configures it on
    /// foundations with instance identity.
    pub fn caching_into_with_identity(
        berth: &Berth,
        ca_file: &Path,
        identity: &InstanceIdentity,
    ) -> Cacher {
        let lines = format!("  identity: instance\n  ca_file: {}\n", ca_file.display());
        Cacher::configured(berth, &lines, "")
            .env("CF_INSTANCE_CERT", &identity.certificate.to_string_lossy())
            .env("CF_INSTANCE_KEY", &identity.key.to_string_lossy())
    }

    /// As the BOSH release sets the cacher up: instance identity, and no `repository_key` (the
    /// bundle is readable by every Docker app); `extra` lines are added to the configuration.
    pub fn keyless_with_identity(
        berth: &Berth,
        ca_file: &Path,
        identity: &InstanceIdentity,
        extra: &str,
    ) -> Cacher {
        let cacher = Cacher::new();
        let config = cacher.dir.path().join("berth-cacher.yml");
        fs::write(
            &config,
            format!(
                "registry:\n  url: {}\n  identity: instance\n  ca_file: {}\n{extra}",
                berth.url(),
                ca_file.display()
            ),
        )
        .expect("write the cacher config");
        cacher
            .env("BERTH_CACHER_CONFIG", &config.to_string_lossy())
            .env("CF_INSTANCE_CERT", &identity.certificate.to_string_lossy())
            .env("CF_INSTANCE_KEY", &identity.key.to_string_lossy())
    }

    /// Like [`Cacher::caching_into`], pushing as `user` with `password`, as the BOSH job
    /// configures the cacher's robot account.
    pub fn caching_into_as(berth: &Berth, (user, password): (&str, &str), extra: &str) -> Cacher {
        let login = format!("  username: {user:?}\n  password: {password:?}\n");
        Cacher::configured(berth, &login, extra)
    }

    /// Like [`Cacher::caching_into`], with `registry_lines` (indented YAML) added to the
    /// `registry:` section.
    pub fn configured(berth: &Berth, registry_lines: &str, extra: &str) -> Cacher {
        Cacher::configured_at(&berth.url(), registry_lines, extra)
    }

    /// Like [`Cacher::configured`], with the internal registry at `url` (a proxy in front of
    /// one, say).
    pub fn configured_at(url: &str, registry_lines: &str, extra: &str) -> Cacher {
        let cacher = Cacher::new();
        let config = cacher.dir.path().join("berth-cacher.yml");
        fs::write(
            &config,
            format!(
                "registry:\n  url: {url}\n{registry_lines}repository_key: {REPOSITORY_KEY}\n{extra}"
            ),
        )
        .expect("write the cacher config");
        cacher.env("BERTH_CACHER_CONFIG", &config.to_string_lossy())
    }

    pub fn env(mut self, name: &str, value: &str) -> Cacher {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Staging for the app `guid`, as Diego describes it in the environment.
    pub fn app(self, guid: &str) -> Cacher {
        self.env(
            "VCAP_APPLICATION",
            &json!({ "application_id": guid, "name": "e2e" }).to_string(),
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn result_path(&self) -> PathBuf {
        self.dir.path().join("out/result.json")
    }

    /// Cloud Controller's flags for `reference`, its registry listed as insecure, and `extra`.
    pub fn builder_args(&self, reference: &str, extra: &[&str]) -> Vec<String> {
        let host = reference.split('/').next().expect("a registry host");
        let mut args = vec![
            format!(
                "-outputMetadataJSONFilename={}",
                self.result_path().display()
            ),
            format!("-dockerRef={reference}"),
            format!("-insecureDockerRegistries={host}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub fn command(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth-cacher"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TMPDIR", self.dir.path().join("tmp"))
            .env("CF_SYSTEM_CERT_PATH", self.dir.path().join("certs"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args);
        cmd
    }

    pub fn run(&self, args: &[String]) -> Outcome {
        Outcome::from_output(run_output(&mut self.command(args), Duration::from_secs(90)))
    }

    /// Starts the cacher without waiting; finish with [`Cacher::wait`].
    pub fn spawn(&self, args: &[String]) -> Child {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start berth-cacher")
    }

    /// Runs the cacher like [`Cacher::run`], also noting when each line of its stdout arrived
    /// (counted from the start).
    pub fn run_timed(&self, args: &[String]) -> (Outcome, Vec<(Duration, String)>) {
        let started = Instant::now();
        let mut child = self.spawn(args);
        let stdout = child.stdout.take().expect("piped stdout");
        let reader = thread::spawn(move || {
            // Split on newlines only, so a carriage return would show in the line.
            io::BufRead::split(io::BufReader::new(stdout), b'\n')
                .map_while(Result::ok)
                .map(|line| {
                    (
                        started.elapsed(),
                        String::from_utf8_lossy(&line).into_owned(),
                    )
                })
                .collect::<Vec<_>>()
        });
        let outcome = self.wait(child);
        let lines = reader.join().expect("the stdout reader");
        let stdout = lines.iter().map(|(_, line)| format!("{line}\n")).collect();
        (Outcome { stdout, ..outcome }, lines)
    }

    pub fn wait(&self, child: Child) -> Outcome {
        Outcome::from_output(wait_output(child, Duration::from_secs(90), "berth-cacher"))
    }

    /// The staging result file, parsed.
    pub fn result(&self) -> Value {
        let bytes = fs::read(self.result_path()).expect("read the staging result");
        serde_json::from_slice(&bytes).expect("the staging result is JSON")
    }
}

/// The repository the cacher must pick for app `guid` under [`REPOSITORY_KEY`]:
/// `cache/<guid>/<first 16 bytes of HMAC-SHA256(key, guid), hex>`.
pub fn cache_repository(guid: &str) -> String {
    use hmac::{Hmac, Mac};
    let key = hex::decode(REPOSITORY_KEY).expect("a hex key");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(guid.as_bytes());
    format!(
        "cache/{guid}/{}",
        hex::encode(&mac.finalize().into_bytes()[..16])
    )
}

/// The tag that marks app `guid`'s newest staging of `reference` read with `credentials` in its
/// repository: `src-<first 16 bytes of HMAC-SHA256(key, parts joined by NUL), hex>`, the parts
/// being `staging-source`, the GUID, the normalised reference (the tests name images on a
/// `host:port`, which normalisation leaves alone), and the user and password if any.
pub fn record_tag(guid: &str, reference: &str, credentials: Option<(&str, &str)>) -> String {
    use hmac::{Hmac, Mac};
    let key = hex::decode(REPOSITORY_KEY).expect("a hex key");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("staging-source\0{guid}\0{reference}").as_bytes());
    if let Some((user, password)) = credentials {
        mac.update(format!("\0{user}\0{password}").as_bytes());
    }
    format!("src-{}", hex::encode(&mac.finalize().into_bytes()[..16]))
}

pub fn new_guid() -> String {
    uuid::Uuid::new_v4().to_string()
}
