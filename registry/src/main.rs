//! The `berth-registry` command: serve the registry, or check a configuration file.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use berth_registry::admin::{self, Answer, Request};
use berth_registry::api::{self, AppState};
use berth_registry::auth::Auth;
use berth_registry::config::{Config, LogFormat, TlsConfig};
use berth_registry::content::{ContentStore, FsContentStore, LocalCache, ObjectContentStore};
use berth_registry::gc::Collector;
use berth_registry::metadata::Usage;
use berth_registry::metadata::{
    CachedMetadata, MetadataStore, SqlMetadataStore, SqliteMetadataStore,
};
use berth_registry::metrics::Metrics;
use berth_registry::retention::Retention;
use berth_registry::{gc, server};
use clap::{Parser, Subcommand};

/// An OCI Distribution v1.1 / Docker Registry v2 server.
///
/// With no arguments it serves on 0.0.0.0:5000 with storage under ./data. Environment overrides:
/// BERTH_LISTEN, BERTH_STORAGE_ROOT, BERTH_LOG, BERTH_LOG_FORMAT, BERTH_TLS_CERTIFICATE,
/// BERTH_TLS_PRIVATE_KEY.
#[derive(Parser)]
#[command(name = "berth-registry", version)]
struct Cli {
    /// YAML configuration file.
    #[arg(long, short, global = true, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry (the default).
    Serve,
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Print an htpasswd line (bcrypt) for USER, reading the password from the first line of
    /// standard input so it never appears in a process list.
    Htpasswd { user: String },
    /// Collect garbage now: retention first, untagged manifests where configured, then blobs
    /// nothing references.
    /// Asks the running server if there is one, else works on the storage itself.
    Gc {
        /// Only say what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// List namespaces and repositories by the storage they use.
    Usage,
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate FILE (with environment overrides applied) and exit.
    Check { file: PathBuf },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Config {
            action: ConfigAction::Check { file },
        } => {
            Config::load(Some(&file))?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Htpasswd { user } => {
            anyhow::ensure!(
                !std::io::stdin().is_terminal(),
                "pipe the password on standard input; typed at a terminal it would be echoed"
            );
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.strip_suffix('\n').unwrap_or(&password);
            let password = password.strip_suffix('\r').unwrap_or(password);
            let line = berth_registry::auth::htpasswd_entry(&user, password)
                .map_err(anyhow::Error::msg)?;
            println!("{line}");
            Ok(())
        }
        Command::Gc { dry_run } => {
            let config = Config::load(cli.config.as_deref())?;
            match maintain(&config, Request::Gc { dry_run })? {
                Answer::Gc(report) => println!("{report}"),
                // With several instances every one may be asked (a BOSH errand runs on each):
                // the collection the other runs is the one asked for.
                Answer::Busy(message) => println!("{message}; nothing to do here"),
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
            Ok(())
        }
        Command::Usage => {
            let config = Config::load(cli.config.as_deref())?;
            match maintain(&config, Request::Usage)? {
                Answer::Usage(usage) => print_usage(&usage),
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
            Ok(())
        }
        Command::Serve => {
            let config = Config::load(cli.config.as_deref())?;
            init_logging(&config);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(config, cli.config))
        }
    }
}

/// Runs a maintenance request: through the running server's socket when a server holds the
/// storage, else on the storage directly (with the data directory locked meanwhile).
fn maintain(config: &Config, request: Request) -> anyhow::Result<Answer> {
    let root = &config.storage.root;
    let answer = match claim_data_directory(root) {
        Ok(lock) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let state = open_state(config).await?;
                let collector = collector(state, config)?;
                let answer = admin::answer(&collector, request).await;
                drop(lock);
                anyhow::Ok(answer)
            })?,
        Err(_) => {
            let socket = admin::socket_path(root);
            admin::ask(&socket, request).with_context(|| {
                format!(
                    "{} is in use by a server; asking it through {}",
                    root.display(),
                    socket.display()
                )
            })?
        }
    };
    if let Answer::Error(message) = &answer {
        anyhow::bail!("{message}");
    }
    Ok(answer)
}

fn print_usage(usage: &Usage) {
    for (heading, entries) in [
        ("namespace", &usage.namespaces),
        ("repository", &usage.repositories),
    ] {
        println!("{:>16}  {heading}", "bytes");
        for entry in entries.iter() {
            println!("{:>16}  {}", entry.bytes, entry.name);
        }
        println!();
    }
    if !usage.quota_scopes.is_empty() {
        println!("{:>16}  {:>16}  scope (quota)", "bytes", "limit");
        for scope in &usage.quota_scopes {
            println!(
                "{:>16}  {:>16}  {} ({})",
                scope.bytes, scope.max_bytes, scope.scope, scope.quota
            );
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log.level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log.format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Re-reads the access control (with the instance identity CA bundle) and quota parts of the
/// configuration, and the certificate and key files named at start-up, on every SIGHUP `hangups`
/// delivers. A broken file or certificate is reported and the running one kept.
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    state: Arc<AppState>,
    tls: Option<(server::ServerTls, TlsConfig)>,
    file: Option<PathBuf>,
) {
    while hangups.recv().await.is_some() {
        if let Some((tls, paths)) = &tls {
            match tls.reload(paths) {
                Ok(()) => {
                    tracing::info!(certificate = %paths.certificate.display(), "TLS certificate reloaded")
                }
                Err(err) => {
                    tracing::error!(error = %err, "TLS reload failed; keeping the running certificate")
                }
            }
        }
        let Some(file) = &file else {
            tracing::warn!(
                "SIGHUP: started without a configuration file, no access control to reload"
            );
            continue;
        };
        let config = match Config::load(Some(file)) {
            Ok(config) => config,
            Err(err) => {
                tracing::error!(file = %file.display(), error = %err, "reload failed; keeping the running configuration");
                continue;
            }
        };
        match state.auth.reload(&config.auth).await {
            Ok(()) => {
                if let Some((tls, _)) = &tls {
                    tls.request_client_certificates(config.auth.instance_identity.is_some());
                }
                tracing::info!(file = %file.display(), "access control reloaded")
            }
            Err(err) => {
                tracing::error!(file = %file.display(), error = %err, "reload failed; keeping the running configuration");
                continue;
            }
        }
        match state.metadata.set_quotas(&config.quotas).await {
            Ok(()) => tracing::info!(quotas = config.quotas.len(), "quotas reloaded"),
            Err(err) => {
                tracing::error!(error = %err, "putting the reloaded quotas in force failed; keeping the running ones")
            }
        }
    }
}

/// Takes the data directory for this process alone: upload sessions and the metadata cache live
/// in its memory, so a second process on the same directory would see stale tags and could
/// interleave appends to one upload. The lock dies with the process, however it ends.
fn claim_data_directory(root: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let path = root.join("berth-registry.lock");
    let lock =
        std::fs::File::create(&path).with_context(|| format!("opening {}", path.display()))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "{} is in use by another berth-registry process; give each instance its own storage root",
            root.display()
        ),
        Err(std::fs::TryLockError::Error(err)) => {
            Err(err).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// The collector `config` describes, retention included.
fn collector(state: Arc<AppState>, config: &Config) -> anyhow::Result<Collector> {
    let retention = Retention::new(config.retention.clone())?;
    Ok(Collector::new(state, config.gc.clone()).with_retention(retention))
}

/// Opens the stores and access control `config` names.
async fn open_state(config: &Config) -> anyhow::Result<Arc<AppState>> {
    let root = &config.storage.root;
    let metrics = Metrics::default();
    let content: Arc<dyn ContentStore> = match &config.storage.content {
        None => Arc::new(
            FsContentStore::open(root)
                .with_context(|| format!("opening storage at {}", root.display()))?,
        ),
        Some(objects) => {
            let store = ObjectContentStore::open(objects)
                .await
                .with_context(|| format!("opening object storage {objects:?}"))?;
            let store: Arc<dyn ContentStore> = match config.storage.redirect_seconds {
                0 => Arc::new(store),
                seconds => Arc::new(store.with_redirects(Duration::from_secs(seconds))),
            };
            match config.storage.blob_cache {
                None => store,
                Some(size) => {
                    let dir = root.join("blob-cache");
                    Arc::new(
                        LocalCache::open(store, &dir, size.0, metrics.clone())
                            .with_context(|| format!("emptying {}", dir.display()))?,
                    )
                }
            }
        }
    };
    let metadata: Arc<dyn MetadataStore> = match &config.storage.metadata {
        None => Arc::new(CachedMetadata::new(
            SqliteMetadataStore::open(&root.join("metadata.sqlite"))
                .context("opening the metadata database")?,
        )),
        // Uncached: the cache is correct only while every write goes through this process, and
        // a shared database may be written by other instances.
        Some(shared) => Arc::new(
            SqlMetadataStore::open(shared)
                .await
                .with_context(|| format!("opening the metadata {}", shared.describe()))?,
        ),
    };
    let auth = Auth::load(&config.auth)
        .await
        .context("loading access control")?;
    let proxy = berth_registry::proxy::Proxy::new(&config.proxy)
        .context("setting up the pull-through cache")?;
    Ok(Arc::new(
        AppState::new(content, metadata, config.limits.clone())
            .with_metrics(metrics)
            .with_auth(auth)
            .with_pull_tracking(config.retention.track_pulls)
            .with_proxy(proxy),
    ))
}

async fn serve(config: Config, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    let started = Instant::now();
    let root = &config.storage.root;
    let _data_lock = claim_data_directory(root)?;
    let state = open_state(&config).await?;
    state
        .metadata
        .set_quotas(&config.quotas)
        .await
        .context("putting the configured quotas in force")?;
    let open_uploads = state
        .metadata
        .uploads()
        .await
        .context("listing upload sessions")?;
    state.metrics.set_upload_sessions(open_uploads.len());
    let collector = Arc::new(collector(state.clone(), &config)?);
    if let Ok(usage) = collector.usage().await {
        state.metrics.set_usage(&usage);
    }
    tokio::spawn(collector.clone().run_forever());
    let socket = admin::socket_path(root);
    let admin = tokio::spawn(admin::serve(socket.clone(), collector));
    tokio::spawn(async move {
        if let Ok(Err(err)) = admin.await {
            tracing::error!(socket = %socket.display(), error = %err, "the maintenance socket stopped");
        }
    });
    tokio::spawn(state.pulls.clone().flush_forever(
        state.metadata.clone(),
        Duration::from_secs(config.retention.pull_flush_seconds),
    ));
    tokio::spawn(gc::purge_idle_uploads_forever(
        state.clone(),
        Duration::from_secs(config.limits.upload_max_idle_seconds),
    ));
    // Installed before serving: a SIGHUP that arrived before the handler would end the process.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let tls = config
        .tls
        .as_ref()
        .map(server::ServerTls::load)
        .transpose()?;
    if let Some(tls) = &tls {
        tls.request_client_certificates(config.auth.instance_identity.is_some());
    }
    tokio::spawn(reload_on_hangup(
        hangups,
        state.clone(),
        tls.clone().zip(config.tls.clone()),
        config_file,
    ));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(
        address = %listener.local_addr()?,
        tls = tls.is_some(),
        storage = %root.display(),
        startup_ms = started.elapsed().as_millis() as u64,
        "berth-registry listening"
    );
    server::serve(
        listener,
        api::router(state.clone()),
        tls,
        shutdown_signal(),
        &config.limits,
    )
    .await;
    if let Err(err) = state.pulls.flush(state.metadata.as_ref()).await {
        tracing::warn!(error = %err, "recording the last manifest pulls at shutdown failed");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
