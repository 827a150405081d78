//! The staging result Cloud Controller reads: start command and execution metadata from the image
//! config, and the image reference every later start will pull.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Diego's rep reads at most this much of the result file.
pub const MAX_RESULT_BYTES: usize = 50 * 1024;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("the image config is not valid JSON: {0}")]
    Config(String),
    #[error("the image exposes port {0:?}, which is not a valid port")]
    Port(String),
    #[error("the staging result would be {0} bytes, over Cloud Foundry's limit of 50 KiB")]
    TooLarge(usize),
}

/// The parts of an image config (`config` object of the OCI/Docker image config) Cloud Foundry uses.
#[derive(Debug, Default, Deserialize)]
struct ImageConfig {
    #[serde(default)]
    config: Option<RuntimeConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RuntimeConfig {
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    user: Option<String>,
}

/// `execution_metadata` exactly as the Go builder encodes it.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExecutionMetadata {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub workdir: String,
    #[serde(rename = "ports", skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<Port>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user: String,
}

/// Capitalised keys: Cloud Controller reads `port['Port']` and `port['Protocol']`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Port {
    pub port: u16,
    pub protocol: String,
}

impl ExecutionMetadata {
    /// Reads the metadata from the raw bytes of an image config blob.
    pub fn from_image_config(bytes: &[u8]) -> Result<ExecutionMetadata, MetadataError> {
        let image: ImageConfig =
            serde_json::from_slice(bytes).map_err(|e| MetadataError::Config(e.to_string()))?;
        let config = image.config.unwrap_or_default();
        let mut ports = config
            .exposed_ports
            .unwrap_or_default()
            .into_keys()
            .map(|key| parse_port(&key))
            .collect::<Result<Vec<_>, _>>()?;
        // By number, tcp before udp at the same number, as the Go builder sorts them.
        ports.sort_by(|a, b| (a.port, &a.protocol).cmp(&(b.port, &b.protocol)));
        Ok(ExecutionMetadata {
            cmd: config.cmd.unwrap_or_default(),
            entrypoint: config.entrypoint.unwrap_or_default(),
            workdir: config.working_dir.unwrap_or_default(),
            exposed_ports: ports,
            user: config.user.unwrap_or_default(),
        })
    }

    /// The `web` start command: entrypoint then cmd, space-separated.
    pub fn start_command(&self) -> String {
        let mut words = self.entrypoint.clone();
        words.extend(self.cmd.iter().cloned());
        words.join(" ")
    }
}

fn parse_port(key: &str) -> Result<Port, MetadataError> {
    let (number, protocol) = key.split_once('/').unwrap_or((key, "tcp"));
    let port = number
        .parse::<u16>()
        .map_err(|_| MetadataError::Port(key.to_owned()))?;
    Ok(Port {
        port,
        protocol: protocol.to_ascii_lowercase(),
    })
}

#[derive(Debug, Serialize)]
struct LifecycleMetadata<'a> {
    docker_image: &'a str,
}

#[derive(Debug, Serialize)]
struct StagingResult<'a> {
    lifecycle_type: &'static str,
    lifecycle_metadata: LifecycleMetadata<'a>,
    process_types: BTreeMap<&'static str, String>,
    /// A JSON document inside a JSON string: Cloud Controller stores it verbatim.
    execution_metadata: String,
}

/// Renders the result file's bytes: one line of JSON and a newline, like Go's `json.Encoder`.
pub fn render(docker_image: &str, metadata: &ExecutionMetadata) -> Result<Vec<u8>, MetadataError> {
    let result = StagingResult {
        lifecycle_type: "docker",
        lifecycle_metadata: LifecycleMetadata { docker_image },
        process_types: BTreeMap::from([("web", metadata.start_command())]),
        execution_metadata: serde_json::to_string(metadata).expect("metadata serialises"),
    };
    let mut bytes = serde_json::to_vec(&result).expect("result serialises");
    bytes.push(b'\n');
    if bytes.len() > MAX_RESULT_BYTES {
        return Err(MetadataError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Writes `bytes` to `path`, creating its directory, through a temporary file and a rename so a
/// reader never sees half a result.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_go_builders_output_byte_for_byte() {
        let config = br#"{"architecture":"amd64","config":{"Cmd":["-bazbot","-foobar"],
            "Entrypoint":["/dockerapp","-t"],"WorkingDir":"/workdir","User":"vcap",
            "ExposedPorts":{"8081/udp":{},"8080/tcp":{},"8081/tcp":{},"53/udp":{}}}}"#;
        let metadata = ExecutionMetadata::from_image_config(config).unwrap();
        let rendered = render("registry.example:8080/cache/x@sha256:abc", &metadata).unwrap();
        let expected = concat!(
            r#"{"lifecycle_type":"docker","lifecycle_metadata":{"docker_image":"registry.example:8080/cache/x@sha256:abc"},"#,
            r#""process_types":{"web":"/dockerapp -t -bazbot -foobar"},"#,
            r#""execution_metadata":"{\"cmd\":[\"-bazbot\",\"-foobar\"],\"entrypoint\":[\"/dockerapp\",\"-t\"],\"workdir\":\"/workdir\","#,
            r#"\"ports\":[{\"Port\":53,\"Protocol\":\"udp\"},{\"Port\":8080,\"Protocol\":\"tcp\"},{\"Port\":8081,\"Protocol\":\"tcp\"},{\"Port\":8081,\"Protocol\":\"udp\"}],\"user\":\"vcap\"}"}"#,
            "\n"
        );
        assert_eq!(String::from_utf8(rendered).unwrap(), expected);
    }

    #[test]
    fn empty_fields_are_omitted() {
        let metadata =
            ExecutionMetadata::from_image_config(br#"{"config":{"Cmd":["sh"]}}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&metadata).unwrap(),
            r#"{"cmd":["sh"]}"#
        );
        assert_eq!(metadata.start_command(), "sh");
        let none = ExecutionMetadata::from_image_config(b"{}").unwrap();
        assert_eq!(serde_json::to_string(&none).unwrap(), "{}");
    }

    #[test]
    fn invalid_ports_and_oversized_results_fail_staging() {
        let bad = br#"{"config":{"ExposedPorts":{"70000/tcp":{}}}}"#;
        assert_eq!(
            ExecutionMetadata::from_image_config(bad).unwrap_err(),
            MetadataError::Port("70000/tcp".into())
        );
        let huge = ExecutionMetadata {
            cmd: vec!["x".repeat(MAX_RESULT_BYTES)],
            ..Default::default()
        };
        assert!(matches!(
            render("i", &huge),
            Err(MetadataError::TooLarge(_))
        ));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::generated::{CASES, damaged_json, json_value};

    const KEYS: &[&str] = &[
        "config",
        "Cmd",
        "Entrypoint",
        "WorkingDir",
        "ExposedPorts",
        "User",
        "Env",
        "80/tcp",
        "8080",
        "70000/udp",
        "x/tcp",
        "/",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        /// Whatever an image config holds, the staging metadata is read from it or refused
        /// without panicking, and what is read renders into a result.
        #[test]
        fn any_image_config_gives_metadata_or_an_error(bytes in damaged_json(json_value(KEYS))) {
            if let Ok(metadata) = ExecutionMetadata::from_image_config(&bytes) {
                metadata.start_command();
                let _ = render("registry.internal/cache/app@sha256:00", &metadata);
            }
        }
    }
}
