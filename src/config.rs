//! Command line and environment configuration.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "medplum-operator",
    version,
    about = "Medplum ClientApplications, AccessPolicies and users as Kubernetes resources"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controllers.
    Run(Box<Settings>),
    /// Print the resources that declare what a Medplum project already holds (read only; no secret values).
    Export(ExportArgs),
    /// Show what the operator would change in Medplum for resources (files, or those applied in a
    /// namespace); exits 1 when it would change something.
    Diff(DiffArgs),
    /// Print every CustomResourceDefinition as YAML.
    Crds {
        /// Write one file per CRD into this folder instead of printing.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Parses Go-style durations such as `30s`, `5m` or `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let parsed: jiff::SignedDuration = text.trim().parse().map_err(|e| format!("invalid duration {text:?}: {e}"))?;
    Duration::try_from(parsed).map_err(|_| format!("duration {text:?} must not be negative"))
}

fn parse_cluster_id(text: &str) -> Result<String, String> {
    let valid = !text.is_empty() && text.len() <= 63 && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if valid { Ok(text.to_string()) } else { Err(format!("cluster id {text:?} must be 1-63 letters, digits or '-'")) }
}

/// What adopting an exported client does with its current secret. Spelled as `spec.adopt.secret` in
/// the CRDs (`Keep`, `Rotate`); any case is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SecretOnAdoption {
    /// Keep it (the connection must allow it: `spec.limits.adoption.allowKeepSecret`).
    #[value(name = "Keep")]
    Keep,
    /// Replace it; the current one keeps working through the grace period.
    #[value(name = "Rotate")]
    Rotate,
}

/// Arguments of `medplum-operator export`.
#[derive(clap::Args, Clone, Debug)]
pub struct ExportArgs {
    /// The namespace the resources are for; its MedplumConnection is read from the cluster.
    #[arg(short, long)]
    pub namespace: String,
    /// The MedplumConnection (in the namespace) to read the project through.
    #[arg(long, default_value = "default")]
    pub connection: String,
    /// Read through this ClusterMedplumConnection instead.
    #[arg(long, conflicts_with = "connection")]
    pub cluster_connection: Option<String>,
    /// The kubeconfig context; default: the current one (or the in-cluster account).
    #[arg(long)]
    pub context: Option<String>,
    /// The cluster id the operator runs with (its ownership tags carry it).
    #[arg(long, env = "CLUSTER_ID", default_value = "default", value_parser = parse_cluster_id)]
    pub cluster_id: String,
    /// What adoption does with each client's current secret.
    #[arg(long, value_enum, ignore_case = true, default_value_t = SecretOnAdoption::Rotate)]
    pub adopt_secret: SecretOnAdoption,
    /// Write one file per resource into a folder per kind here, instead of printing one stream.
    #[arg(short, long)]
    pub output_dir: Option<std::path::PathBuf>,
}

/// Arguments of `medplum-operator diff`.
#[derive(clap::Args, Clone, Debug)]
pub struct DiffArgs {
    /// The namespace of the resources (and of their MedplumConnections).
    #[arg(short, long)]
    pub namespace: String,
    /// A YAML file, or a folder of them, with the resources to compare; default: those applied in the namespace.
    #[arg(short, long)]
    pub filename: Option<std::path::PathBuf>,
    /// The kubeconfig context; default: the current one.
    #[arg(long)]
    pub context: Option<String>,
    /// The cluster id the operator runs with.
    #[arg(long, env = "CLUSTER_ID", default_value = "default", value_parser = parse_cluster_id)]
    pub cluster_id: String,
}

/// Settings of `medplum-operator run`. Every flag has an environment fallback.
#[derive(clap::Args, Clone, Debug)]
pub struct Settings {
    /// Namespaces to watch (comma separated). Empty: all namespaces.
    #[arg(long, env = "WATCH_NAMESPACES", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    /// Label selector choosing the ClusterMedplumConnections and DomainConfigurations this instance
    /// serves. Empty: all.
    #[arg(long, env = "CLUSTER_CONNECTION_SELECTOR", default_value = "")]
    pub cluster_connection_selector: String,
    /// How often connections are verified again when nothing changed.
    #[arg(long, env = "RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// How often each connection asks Medplum what changed among the objects it manages (one search
    /// per type), so that a console edit is put back within seconds; 0 leaves that to the sweep of
    /// every object at each resync.
    #[arg(long, env = "DRIFT_POLL_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub drift_poll_interval: Duration,
    /// Timeout of one request to Medplum.
    #[arg(long, env = "MEDPLUM_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub medplum_timeout: Duration,
    /// Names this cluster in the ownership tags written to Medplum, so that several clusters can share a
    /// Medplum project without taking over each other's objects.
    #[arg(long, env = "CLUSTER_ID", default_value = "default", value_parser = parse_cluster_id)]
    pub cluster_id: String,
    /// ClientApplications reconciled at once, per watched scope.
    #[arg(long, env = "CLIENT_CONCURRENCY", default_value_t = 4)]
    pub client_concurrency: u16,
    /// AccessPolicies reconciled at once, per watched scope.
    #[arg(long, env = "POLICY_CONCURRENCY", default_value_t = 2)]
    pub policy_concurrency: u16,
    /// ProjectUsers reconciled at once, per watched scope.
    #[arg(long, env = "USER_CONCURRENCY", default_value_t = 2)]
    pub user_concurrency: u16,
    /// Connections reconciled at once, per watched scope.
    #[arg(long, env = "CONNECTION_CONCURRENCY", default_value_t = 2)]
    pub connection_concurrency: u16,
    /// Act only while holding a Lease, so that of several replicas one acts and the others stand by.
    #[arg(long, env = "LEADER_ELECTION")]
    pub leader_election: bool,
    /// Namespace of the Lease; default: the pod's namespace (POD_NAMESPACE), else `default`.
    #[arg(long, env = "LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, env = "LEADER_ELECTION_LEASE_NAME", default_value = "medplum-operator")]
    pub leader_election_lease_name: String,
    /// How long a lease not renewed stays with its holder before a standby takes it.
    #[arg(long, env = "LEADER_ELECTION_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub leader_election_lease_duration: Duration,
    /// How long the leader keeps acting without a successful renewal before it stops.
    #[arg(long, env = "LEADER_ELECTION_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub leader_election_renew_deadline: Duration,
    /// How often the lease is renewed, or tried by a standby.
    #[arg(long, env = "LEADER_ELECTION_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub leader_election_retry_period: Duration,
    /// Address of the HTTP server for /healthz, /readyz and /metrics.
    #[arg(long, env = "HTTP_ADDRESS", default_value = "0.0.0.0:8080")]
    pub http_address: SocketAddr,
    /// Log format; the level comes from RUST_LOG (default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("720h"), Ok(Duration::from_secs(720 * 3600)));
        assert!(parse_duration("-5m").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn settings_have_documented_defaults() {
        let cli = Cli::try_parse_from(["medplum-operator", "run"]).unwrap();
        let Command::Run(settings) = cli.command else { panic!("expected run") };
        assert!(settings.watch_namespaces.is_empty());
        assert_eq!(settings.resync_interval, Duration::from_secs(300));
        assert_eq!(settings.http_address.to_string(), "0.0.0.0:8080");
    }

    #[test]
    fn adopt_secret_takes_the_crd_spelling_and_lowercase() {
        for (value, expected) in
            [("Keep", SecretOnAdoption::Keep), ("keep", SecretOnAdoption::Keep), ("Rotate", SecretOnAdoption::Rotate)]
        {
            let cli = Cli::try_parse_from(["medplum-operator", "export", "-n", "a", "--adopt-secret", value]).unwrap();
            let Command::Export(args) = cli.command else { panic!("expected export") };
            assert_eq!(args.adopt_secret, expected, "{value}");
        }
        assert!(Cli::try_parse_from(["medplum-operator", "export", "-n", "a", "--adopt-secret", "Forget"]).is_err());
    }
}

/// The README's command lines and its flag table, and the `--help` texts, against the parser: they
/// cannot drift apart.
#[cfg(test)]
mod documented {
    use clap::CommandFactory;

    use super::*;

    fn readme() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
    }

    /// The command lines in `text`: inline code and code block lines that run the binary (also as
    /// `cargo run -- ...`), without the binary's name.
    fn command_lines(text: &str) -> Vec<String> {
        let (mut block_lines, mut prose) = (Vec::new(), String::new());
        let mut in_block = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_block = !in_block;
            } else if in_block {
                block_lines.push(line.trim());
            } else {
                prose.push_str(line);
                prose.push(' ');
            }
        }
        // Inline code may run over a line break.
        let spans = prose.split('`').skip(1).step_by(2).chain(block_lines);
        spans
            .flat_map(|s| s.split(" && "))
            .filter_map(|span| {
                let span = span.split(" #").next().unwrap_or_default().trim();
                let rest = span.strip_prefix("medplum-operator ").or_else(|| span.strip_prefix("cargo run -- "))?;
                rest.split_whitespace().next().is_some_and(|w| !w.starts_with('-')).then(|| rest.to_string())
            })
            .collect()
    }

    /// A synopsis as invocations: optional groups (`[a | b]`) left out, then each alternative of each
    /// group on its own; each `A|B` value in turn; placeholders (`NAME`, `FILE_OR_DIR`, `<id>`) filled.
    fn invocations(synopsis: &str) -> Vec<Vec<String>> {
        // Parts: a plain word, or a group of alternatives, each a list of words.
        enum Part {
            Word(String),
            Group(Vec<Vec<String>>),
        }
        let mut parts = Vec::new();
        let mut rest = synopsis;
        while let Some(start) = rest.find('[') {
            parts.extend(rest[..start].split_whitespace().map(|w| Part::Word(w.into())));
            let end = start + rest[start..].find(']').expect("a closed group");
            let alternatives = rest[start + 1..end].split(" | ");
            parts.push(Part::Group(alternatives.map(|a| a.split_whitespace().map(String::from).collect()).collect()));
            rest = &rest[end + 1..];
        }
        parts.extend(rest.split_whitespace().map(|w| Part::Word(w.into())));
        let fill = |word: &str, choice: usize| -> String {
            let values: Vec<&str> = word.split('|').collect();
            let word = values[choice.min(values.len() - 1)];
            let placeholder =
                word.starts_with('<') || (word.len() > 1 && word.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
            if placeholder { "x".into() } else { word.into() }
        };
        let words = |chosen: Option<(usize, usize, usize)>| -> Vec<String> {
            let mut out = Vec::new();
            for (i, part) in parts.iter().enumerate() {
                match part {
                    Part::Word(w) => out.push(fill(w, 0)),
                    Part::Group(alternatives) => {
                        if let Some((group, alternative, value)) = chosen.filter(|(g, _, _)| *g == i) {
                            let _ = group;
                            out.extend(alternatives[alternative].iter().map(|w| fill(w, value)));
                        }
                    }
                }
            }
            out
        };
        let mut all = vec![words(None)];
        for (i, part) in parts.iter().enumerate() {
            let Part::Group(alternatives) = part else { continue };
            for (a, alternative) in alternatives.iter().enumerate() {
                let values = alternative.iter().map(|w| w.split('|').count()).max().unwrap_or(1);
                all.extend((0..values).map(|v| words(Some((i, a, v)))));
            }
        }
        all
    }

    fn parses(line: &str, source: &str) {
        for args in invocations(line) {
            let argv = std::iter::once("medplum-operator".to_string()).chain(args.clone());
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("{source}: `medplum-operator {}` (from `{line}`) does not parse:\n{e}", args.join(" "));
            }
        }
    }

    #[test]
    fn the_readmes_command_lines_parse() {
        let lines = command_lines(&readme());
        for expected in ["export -n team-a", "diff -n team-a", "crds --dir crds", "run"] {
            assert!(lines.iter().any(|l| l.starts_with(expected)), "the README shows `{expected}`: {lines:?}");
        }
        for line in &lines {
            parses(line, "README.md");
        }
        let synopsis = lines.iter().find(|l| l.starts_with("export")).unwrap();
        assert!(invocations(synopsis).iter().any(|a| a.ends_with(&["--adopt-secret".into(), "Keep".into()])));
    }

    #[test]
    fn the_readmes_flag_table_is_the_run_commands() {
        let command = Cli::command();
        let run = command.find_subcommand("run").expect("run");
        let mut rows = 0;
        for row in readme().lines().filter(|l| l.starts_with("| `--")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let flag = cells[1].trim_matches('`').trim_start_matches("--");
            let arg = run.get_arguments().find(|a| a.get_long() == Some(flag));
            let arg = arg.unwrap_or_else(|| panic!("README documents --{flag}, which `run` does not take"));
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert_eq!(env.as_deref(), Some(cells[2].trim_matches('`')), "--{flag}: its environment variable");
            let default: Vec<String> =
                arg.get_default_values().iter().map(|d| d.to_string_lossy().into_owned()).collect();
            let literal = cells[3].strip_prefix('`').and_then(|d| d.strip_suffix('`')).filter(|d| !d.contains('`'));
            if let Some(documented) = literal {
                assert_eq!(default, [documented], "--{flag}: its default");
            }
            rows += 1;
        }
        let documented = run.get_arguments().filter(|a| a.get_long().is_some_and(|l| l != "help")).count();
        assert_eq!(rows, documented, "every flag of `run` is in the README's table");
    }

    #[test]
    fn the_help_texts_command_lines_parse() {
        let mut command = Cli::command();
        let mut help = command.render_long_help().to_string();
        for sub in command.get_subcommands_mut() {
            help.push_str(&sub.render_long_help().to_string());
        }
        for line in command_lines(&help) {
            parses(&line, "--help");
        }
    }
}
