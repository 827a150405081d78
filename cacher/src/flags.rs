//! The Docker lifecycle builder's command line, parsed the way Go's `flag` package does.

use std::path::PathBuf;

use crate::secret::{ArgSecret, Secret};

/// Where Cloud Controller has always looked when no output path is given.
const DEFAULT_OUTPUT: &str = "/tmp/result/result.json";

/// Flags of the 2015-2016 caching builder. Cloud Controller no longer sends them, but old
/// deployments and scripts may: they are accepted and ignored with a warning.
const LEGACY_VALUE_FLAGS: &[&str] = &[
    "dockerDaemonExecutablePath",
    "dockerDaemonUnixSocket",
    "dockerRegistryIPs",
    "dockerRegistryHost",
    "dockerRegistryPort",
    "dockerLoginServer",
    "dockerEmail",
];
const LEGACY_BOOL_FLAGS: &[&str] = &["cacheDockerImage", "dockerRegistryRequireTLS"];

#[derive(Debug, Default)]
pub struct BuilderArgs {
    pub output: PathBuf,
    pub docker_ref: String,
    pub insecure_registries: Vec<String>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// Read the password from the first line of standard input.
    pub password_stdin: bool,
    /// Where the password sits in argv, for [`crate::secret::scrub_process_memory`].
    pub argv_secrets: Vec<ArgSecret>,
    /// Flags accepted only for compatibility, to warn about.
    pub ignored: Vec<String>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    #[error("missing flag: dockerRef required")]
    MissingRef,
    #[error("flag needs an argument: -{0}")]
    MissingValue(String),
    #[error("invalid boolean value {1:?} for -{0}")]
    InvalidBool(String, String),
    #[error("ip:port expected for Docker Registry [{0}]")]
    RegistryWithoutPort(String),
    #[error("no scheme allowed for Docker Registry [{0}]")]
    RegistryWithScheme(String),
    #[error("-insecureDockerRegistries may be given only once")]
    RepeatedInsecure,
    #[error("unexpected argument {0:?}")]
    Positional(String),
    #[error("help requested")]
    Help,
}

pub const USAGE: &str = "\
usage: berth-cacher -dockerRef=IMAGE [-outputMetadataJSONFilename=PATH]
                    [-insecureDockerRegistries=host:port,...]
                    [-dockerUser=USER (-dockerPassword=PASSWORD | -dockerPasswordStdin)]
       berth-cacher import FILE --to REFERENCE

The password may also come from the environment (CF_DOCKER_PASSWORD); it is scrubbed from this
process's command line and environment as soon as it has been read.";

/// Parses `args` (without the program name). Go accepts `-name=value`, `-name value`,
/// `--name=value`, and booleans as `-name` or `-name=true`; flag parsing stops at `--` or the
/// first non-flag argument.
pub fn parse(args: &[String]) -> Result<BuilderArgs, FlagError> {
    let mut parsed = BuilderArgs {
        output: PathBuf::from(DEFAULT_OUTPUT),
        ..BuilderArgs::default()
    };
    let mut insecure_seen = false;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let argv_index = i + 1;
        i += 1;
        if arg == "--" {
            break;
        }
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return Err(FlagError::Positional(arg.clone()));
        };
        if flag.is_empty() {
            return Err(FlagError::Positional(arg.clone()));
        }
        let (name, inline) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (flag, None),
        };
        if matches!(name, "h" | "help") {
            return Err(FlagError::Help);
        }
        if name == "dockerPasswordStdin" || LEGACY_BOOL_FLAGS.contains(&name) {
            let on = match inline {
                None | Some("true" | "1" | "t" | "T" | "TRUE" | "True") => true,
                Some("false" | "0" | "f" | "F" | "FALSE" | "False") => false,
                Some(other) => return Err(FlagError::InvalidBool(name.into(), other.into())),
            };
            if name == "dockerPasswordStdin" {
                parsed.password_stdin = on;
            } else {
                parsed.ignored.push(name.to_owned());
            }
            continue;
        }
        const VALUE_FLAGS: &[&str] = &[
            "outputMetadataJSONFilename",
            "dockerRef",
            "insecureDockerRegistries",
            "dockerUser",
            "dockerPassword",
        ];
        if !VALUE_FLAGS.contains(&name) {
            // An unknown flag takes the next argument only if that cannot be a flag itself.
            let takes_next = inline.is_none()
                && (LEGACY_VALUE_FLAGS.contains(&name)
                    || args.get(i).is_some_and(|next| !next.starts_with('-')));
            if takes_next {
                i += 1;
            }
            parsed.ignored.push(name.to_owned());
            continue;
        }
        // The value is either inline or the next argument; remember where it sits in argv.
        let (value, value_index, value_offset) = match inline {
            Some(value) => (value.to_owned(), argv_index, arg.len() - value.len()),
            None => {
                let value = args
                    .get(i)
                    .ok_or_else(|| FlagError::MissingValue(name.to_owned()))?;
                i += 1;
                (value.clone(), argv_index + 1, 0)
            }
        };
        match name {
            "outputMetadataJSONFilename" => parsed.output = PathBuf::from(value),
            "dockerRef" => parsed.docker_ref = value,
            "insecureDockerRegistries" => {
                if insecure_seen {
                    return Err(FlagError::RepeatedInsecure);
                }
                insecure_seen = true;
                parsed.insecure_registries = parse_insecure(&value)?;
            }
            "dockerUser" => parsed.user = Some(value).filter(|v| !v.is_empty()),
            "dockerPassword" => {
                parsed.argv_secrets.push(ArgSecret {
                    index: value_index,
                    offset: value_offset,
                });
                parsed.password = Some(Secret::new(value)).filter(|v| !v.expose().is_empty());
            }
            _ => unreachable!("only VALUE_FLAGS reach here"),
        }
    }
    if let Some(extra) = args.get(i) {
        return Err(FlagError::Positional(extra.clone()));
    }
    if parsed.docker_ref.is_empty() {
        return Err(FlagError::MissingRef);
    }
    Ok(parsed)
}

/// Whether `name` is a flag this builder knows, so callers can tell "legacy" from "unknown".
pub fn is_legacy(name: &str) -> bool {
    LEGACY_VALUE_FLAGS.contains(&name) || LEGACY_BOOL_FLAGS.contains(&name)
}

fn parse_insecure(list: &str) -> Result<Vec<String>, FlagError> {
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            if entry.contains("://") {
                Err(FlagError::RegistryWithScheme(entry.to_owned()))
            } else if !entry.contains(':') {
                Err(FlagError::RegistryWithoutPort(entry.to_owned()))
            } else {
                Ok(entry.to_owned())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn accepts_every_go_flag_spelling() {
        let parsed = parse(&args(&[
            "-outputMetadataJSONFilename=/tmp/result.json",
            "--dockerRef",
            "ubuntu",
            "-insecureDockerRegistries=a:1, b:2",
            "-dockerUser",
            "me",
            "--dockerPassword=pw",
        ]))
        .unwrap();
        assert_eq!(parsed.output, PathBuf::from("/tmp/result.json"));
        assert_eq!(parsed.docker_ref, "ubuntu");
        assert_eq!(parsed.insecure_registries, ["a:1", "b:2"]);
        assert_eq!(parsed.user.as_deref(), Some("me"));
        assert_eq!(parsed.password.as_ref().unwrap().expose(), "pw");
        // argv[7] is "--dockerPassword=pw"; the value starts after the '='.
        assert_eq!(
            parsed.argv_secrets,
            [ArgSecret {
                index: 7,
                offset: 17
            }]
        );
    }

    #[test]
    fn password_as_separate_argument_is_located_for_scrubbing() {
        let parsed = parse(&args(&["-dockerRef=x", "-dockerPassword", "pw"])).unwrap();
        assert_eq!(
            parsed.argv_secrets,
            [ArgSecret {
                index: 3,
                offset: 0
            }]
        );
    }

    #[test]
    fn legacy_flags_are_ignored_not_fatal() {
        let parsed = parse(&args(&[
            "-dockerRef=x",
            "-cacheDockerImage",
            "-dockerRegistryPort=8080",
            "-dockerEmail",
            "a@b.c",
        ]))
        .unwrap();
        assert_eq!(
            parsed.ignored,
            ["cacheDockerImage", "dockerRegistryPort", "dockerEmail"]
        );
        assert!(parsed.ignored.iter().all(|f| is_legacy(f)));
        assert_eq!(parsed.output, PathBuf::from(DEFAULT_OUTPUT));
    }

    #[test]
    fn unknown_flags_do_not_swallow_the_next_flag() {
        let parsed = parse(&args(&["-someNewBool", "-dockerRef=x", "-other", "v"])).unwrap();
        assert_eq!(parsed.docker_ref, "x");
        assert_eq!(parsed.ignored, ["someNewBool", "other"]);
        assert!(!is_legacy("other"));
    }

    #[test]
    fn bad_flags_are_errors() {
        assert_eq!(parse(&args(&[])).unwrap_err(), FlagError::MissingRef);
        assert_eq!(
            parse(&args(&["-dockerRef"])).unwrap_err(),
            FlagError::MissingValue("dockerRef".into())
        );
        assert_eq!(
            parse(&args(&[
                "-dockerRef=x",
                "-insecureDockerRegistries=http://a:1"
            ]))
            .unwrap_err(),
            FlagError::RegistryWithScheme("http://a:1".into())
        );
        assert_eq!(
            parse(&args(&["-dockerRef=x", "-insecureDockerRegistries=a"])).unwrap_err(),
            FlagError::RegistryWithoutPort("a".into())
        );
        assert!(matches!(
            parse(&args(&["-dockerRef=x", "stray"])),
            Err(FlagError::Positional(_))
        ));
        assert!(matches!(
            parse(&args(&["-dockerRef=x", "-cacheDockerImage=maybe"])),
            Err(FlagError::InvalidBool(..))
        ));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::generated::{CASES, text_of};

    const PIECES: &[&str] = &[
        "-",
        "--",
        "=",
        "-dockerRef",
        "-dockerPassword",
        "--dockerPassword=",
        "-dockerUser",
        "-dockerPasswordStdin",
        "-outputMetadataJSONFilename",
        "-insecureDockerRegistries",
        "-cacheDockerImage",
        "-dockerEmail",
        "-h",
        "true",
        "false",
        "host:5000",
        ",",
        "ubuntu",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        /// Any command line parses or is refused without panicking; a password it accepts is
        /// where the scrubber will look for it.
        #[test]
        fn any_command_line_parses_or_is_refused(
            args in prop::collection::vec(text_of(PIECES), 0..6)
        ) {
            if let Ok(parsed) = parse(&args) {
                for secret in &parsed.argv_secrets {
                    let arg = args.get(secret.index - 1);
                    prop_assert!(arg.is_some_and(|a| secret.offset <= a.len()), "{:?}", secret);
                }
                if let Some(password) = &parsed.password {
                    let found = parsed.argv_secrets.iter().any(|secret| {
                        args[secret.index - 1].as_bytes()[secret.offset..] == *password.expose().as_bytes()
                    });
                    prop_assert!(found, "{:?}", parsed.argv_secrets);
                }
            }
        }
    }
}
