//! berth-cacher: the Docker lifecycle builder's command line, plus `import`.

use std::io::BufRead;
use std::process::ExitCode;

use berth_cacher::client::Credentials;
use berth_cacher::config::CacherConfig;
use berth_cacher::flags::{self, FlagError};
use berth_cacher::secret::{self, Secret};
use berth_cacher::stage::{self, StageRequest, StagingEnv};
use zeroize::Zeroize;

/// Exit statuses Cloud Controller's users know from the Go builder.
const EXIT_BAD_FLAGS: u8 = 1;
const EXIT_STAGING_FAILED: u8 = 2;

/// Environment variables a password may come in; scrubbed from `/proc/self/environ` once read.
const PASSWORD_ENV: &[&str] = &["CF_DOCKER_PASSWORD", "BERTH_REGISTRY_PASSWORD"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "import") {
        return berth_cacher::import::main(&args[1..]);
    }
    builder_main(args)
}

fn builder_main(mut args: Vec<String>) -> ExitCode {
    let parsed = flags::parse(&args);
    // The password is in `parsed` now; the copy std made of argv goes.
    args.zeroize();
    // Scrub before anything else can fail, so even a bad command line does not linger.
    let argv_secrets = parsed
        .as_ref()
        .map(|p| p.argv_secrets.clone())
        .unwrap_or_default();
    let env_password = PASSWORD_ENV
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
    if let Err(err) = secret::scrub_process_memory(&argv_secrets, PASSWORD_ENV) {
        eprintln!("warning: could not scrub credentials from the process table: {err}");
    }
    let parsed = match parsed {
        Ok(parsed) => parsed,
        Err(FlagError::Help) => {
            println!("{}", flags::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("{err}\n{}", flags::USAGE);
            return ExitCode::from(EXIT_BAD_FLAGS);
        }
    };
    for ignored in &parsed.ignored {
        let kind = if flags::is_legacy(ignored) {
            "legacy"
        } else {
            "unknown"
        };
        eprintln!("warning: ignoring {kind} flag -{ignored}");
    }
    let password = if parsed.password_stdin {
        let mut line = String::new();
        if let Err(err) = std::io::stdin().lock().read_line(&mut line) {
            eprintln!("reading the password from standard input: {err}");
            return ExitCode::from(EXIT_BAD_FLAGS);
        }
        Some(Secret::from_line(line))
    } else {
        parsed.password.or(env_password.map(Secret::new))
    };
    let credentials = match (parsed.user, password) {
        (Some(username), Some(password)) => Some(Credentials { username, password }),
        (None, None) => None,
        (Some(_), None) => {
            eprintln!(
                "-dockerUser needs a password (-dockerPassword, -dockerPasswordStdin or CF_DOCKER_PASSWORD)"
            );
            return ExitCode::from(EXIT_BAD_FLAGS);
        }
        (None, Some(_)) if parsed.password_stdin || !parsed.argv_secrets.is_empty() => {
            eprintln!("a password needs -dockerUser");
            return ExitCode::from(EXIT_BAD_FLAGS);
        }
        // A password in the environment alone is not a request to log in.
        (None, Some(_)) => None,
    };

    println!("Staging process started ...");
    let config = match CacherConfig::discover() {
        Ok(config) => config,
        Err(err) => return failed(&format!("cacher configuration: {err}")),
    };
    let request = StageRequest {
        docker_ref: parsed.docker_ref,
        output: parsed.output,
        insecure_registries: parsed.insecure_registries,
        credentials,
    };
    // One thread: staging mostly waits on sockets and one core hashes faster than registries
    // serve; more threads only contend with the registries for the cores and cost CPU.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return failed(&format!("starting the runtime: {err}")),
    };
    let env = StagingEnv::from_process();
    match runtime.block_on(stage::run(request, config.as_ref(), &env)) {
        Ok(image) => {
            println!("Image: {image}");
            println!("Staging process finished");
            ExitCode::SUCCESS
        }
        Err(err) => failed(&err.to_string()),
    }
}

fn failed(reason: &str) -> ExitCode {
    eprintln!("Staging process failed: {reason}");
    ExitCode::from(EXIT_STAGING_FAILED)
}
