//! One-shot credentials: a type that never prints its value, and scrubbing of the copies the
//! kernel still shows in `/proc/<pid>/cmdline` and `/proc/<pid>/environ`.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

use zeroize::{Zeroize, Zeroizing};

/// A password or token. `Debug` prints a placeholder, so the value cannot reach a log line or an
/// error message by accident, and the memory that held it is zeroed when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(Zeroizing::new(value))
    }

    /// Takes the line read from a terminal or pipe without its line ending, zeroing `line`.
    pub fn from_line(mut line: String) -> Secret {
        let end = line.trim_end_matches(['\r', '\n']).len();
        // Truncating zeroes nothing: overwrite the ending first.
        line[end..].zeroize();
        line.truncate(end);
        Secret::new(line)
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where a secret sits in this process's original argument vector: argument `index`, from byte
/// `offset` to its end (`-dockerPassword=VALUE` has the value at offset 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgSecret {
    pub index: usize,
    pub offset: usize,
}

/// Overwrites, in this process's own memory, the argument bytes named by `args` and the values of
/// the environment variables named in `env_names`, so `/proc/<pid>/cmdline` and `environ` stop
/// showing them. Cloud Controller passes registry passwords as flags; without this every user of
/// the staging container could read them with `ps`.
///
/// The kernel publishes where those strings live (`arg_start`..`env_end` in `/proc/self/stat`),
/// and `/proc/self/mem` lets a process rewrite its own pages without any unsafe code.
pub fn scrub_process_memory(args: &[ArgSecret], env_names: &[&str]) -> io::Result<()> {
    if args.is_empty() && env_names.is_empty() {
        return Ok(());
    }
    let stat = fs::read_to_string("/proc/self/stat")?;
    let [arg_start, arg_end, env_start, env_end] = memory_layout(&stat)?;
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")?;
    if !args.is_empty() {
        rewrite_region(&mem, arg_start, arg_end, |area| mask_args(area, args))?;
    }
    if !env_names.is_empty() {
        rewrite_region(&mem, env_start, env_end, |area| mask_env(area, env_names))?;
    }
    Ok(())
}

/// `arg_start`, `arg_end`, `env_start`, `env_end`: fields 48 to 51 of `/proc/self/stat`.
fn memory_layout(stat: &str) -> io::Result<[u64; 4]> {
    let invalid = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/self/stat");
    // The command name (field 2) may contain spaces; fields are counted after its closing paren.
    let after_comm = &stat[stat.rfind(')').ok_or_else(invalid)? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |n: usize| -> io::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(invalid)
    };
    Ok([field(48)?, field(49)?, field(50)?, field(51)?])
}

fn rewrite_region(
    mem: &std::fs::File,
    start: u64,
    end: u64,
    mask: impl FnOnce(&mut [u8]) -> bool,
) -> io::Result<()> {
    let mut area = vec![0u8; end.saturating_sub(start) as usize];
    mem.read_exact_at(&mut area, start)?;
    if mask(&mut area) {
        mem.write_all_at(&area, start)?;
    }
    Ok(())
}

/// Replaces the secret bytes with `*`, keeping every length so the layout stays intact.
fn mask_args(area: &mut [u8], secrets: &[ArgSecret]) -> bool {
    let mut changed = false;
    for (index, arg) in area.split_mut(|&b| b == 0).enumerate() {
        for secret in secrets.iter().filter(|s| s.index == index) {
            if let Some(value) = arg.get_mut(secret.offset..) {
                value.fill(b'*');
                changed = true;
            }
        }
    }
    changed
}

fn mask_env(area: &mut [u8], names: &[&str]) -> bool {
    let mut changed = false;
    for entry in area.split_mut(|&b| b == 0) {
        let Some(eq) = entry.iter().position(|&b| b == b'=') else {
            continue;
        };
        if names.iter().any(|name| name.as_bytes() == &entry[..eq]) {
            entry[eq + 1..].fill(b'*');
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Secret::new("hunter2".into());
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn a_line_loses_only_its_ending() {
        assert_eq!(Secret::from_line("pw\r\n".into()).expose(), "pw");
        assert_eq!(Secret::from_line("p w\n".into()).expose(), "p w");
        assert_eq!(Secret::from_line("pw".into()).expose(), "pw");
    }

    #[test]
    fn masks_only_the_named_bytes() {
        let mut area = b"builder\0-dockerPassword=abc\0-dockerUser=u\0".to_vec();
        assert!(mask_args(
            &mut area,
            &[ArgSecret {
                index: 1,
                offset: 16
            }]
        ));
        assert_eq!(area, b"builder\0-dockerPassword=***\0-dockerUser=u\0");

        let mut env = b"A=1\0CF_DOCKER_PASSWORD=s3cret\0B=2\0".to_vec();
        assert!(mask_env(&mut env, &["CF_DOCKER_PASSWORD"]));
        assert_eq!(env, b"A=1\0CF_DOCKER_PASSWORD=******\0B=2\0");
    }

    #[test]
    fn reads_the_layout_even_with_spaces_in_the_command_name() {
        let mut stat = String::from("42 (my prog) S");
        for n in 4..=52 {
            stat.push_str(&format!(" {n}"));
        }
        assert_eq!(memory_layout(&stat).unwrap(), [48, 49, 50, 51]);
    }
}
