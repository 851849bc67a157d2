//! `chaperone ca init|show|export`: the CA agent pods must trust.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Subcommand;

use super::{
    CaOpened, LocalCa,
    ca::{CA_CERT_FILE, CA_KEY_FILE, DEFAULT_CA_DIR, pem_of},
    parse_certificates,
    upstream::SERVICE_ACCOUNT_DIR,
};

/// Manage chaperone's local certificate authority.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the CA if there is none yet (ca.crt, and ca.key with mode 0600),
    /// and say where it is. An existing CA is kept as it is.
    Init {
        /// Directory of the CA (the node agent's --ca-dir; `--dir` is the
        /// older spelling).
        #[arg(
            long = "ca-dir",
            visible_alias = "dir",
            env = "CHAPERONE_CA_DIR",
            default_value = DEFAULT_CA_DIR
        )]
        dir: PathBuf,
    },
    /// Print the CA's subject, validity and SHA-256 fingerprint.
    Show {
        /// Directory of the CA (the node agent's --ca-dir; `--dir` is the
        /// older spelling).
        #[arg(
            long = "ca-dir",
            visible_alias = "dir",
            env = "CHAPERONE_CA_DIR",
            default_value = DEFAULT_CA_DIR
        )]
        dir: PathBuf,
    },
    /// Print the PEM bundle agent pods must trust: the cluster CA followed by
    /// chaperone's CA.
    Export {
        /// Directory of the CA (the node agent's --ca-dir; `--dir` is the
        /// older spelling).
        #[arg(
            long = "ca-dir",
            visible_alias = "dir",
            env = "CHAPERONE_CA_DIR",
            default_value = DEFAULT_CA_DIR
        )]
        dir: PathBuf,
        /// The cluster CA (PEM) to put first in the bundle; defaults to the
        /// service-account ca.crt when running in a pod.
        #[arg(long, value_name = "FILE")]
        cluster_ca: Option<PathBuf>,
    },
}

pub fn run(command: CaCommand) -> anyhow::Result<ExitCode> {
    let mut out = String::new();
    match command {
        CaCommand::Init { dir } => init(&dir, &mut out)?,
        CaCommand::Show { dir } => show(&dir, &mut out)?,
        CaCommand::Export { dir, cluster_ca } => {
            let default = Path::new(SERVICE_ACCOUNT_DIR).join("ca.crt");
            let cluster_ca = cluster_ca.or_else(|| default.exists().then_some(default));
            if cluster_ca.is_none() {
                eprintln!(
                    "warning: no --cluster-ca given and not in a pod: the bundle holds only \
                     chaperone's CA, so agents will not trust the real API server with it"
                );
            }
            export(&dir, cluster_ca.as_deref(), &mut out)?;
        }
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn init(dir: &Path, out: &mut String) -> anyhow::Result<()> {
    let (ca, opened) = LocalCa::open(dir)?;
    let verb = match opened {
        CaOpened::Created => "created",
        CaOpened::Loaded => "already present, kept",
    };
    writeln!(out, "chaperone CA {verb}:")?;
    writeln!(out, "  certificate: {}", dir.join(CA_CERT_FILE).display())?;
    writeln!(
        out,
        "  key:         {} (mode 0600)",
        dir.join(CA_KEY_FILE).display()
    )?;
    write_info(&ca, out)
}

fn show(dir: &Path, out: &mut String) -> anyhow::Result<()> {
    let ca = load(dir)?;
    write_info(&ca, out)
}

fn export(dir: &Path, cluster_ca: Option<&Path>, out: &mut String) -> anyhow::Result<()> {
    let ca = load(dir)?;
    if let Some(path) = cluster_ca {
        let pem = fs::read(path)
            .with_context(|| format!("cannot read the cluster CA {}", path.display()))?;
        for cert in parse_certificates(&path.display().to_string(), &pem)? {
            out.push_str(&pem_of(&cert));
        }
    }
    out.push_str(ca.bundle_pem());
    Ok(())
}

fn load(dir: &Path) -> anyhow::Result<LocalCa> {
    LocalCa::load(dir)?.with_context(|| {
        format!(
            "there is no CA in {}; create one with `chaperone ca init --ca-dir {}`",
            dir.display(),
            dir.display()
        )
    })
}

fn write_info(ca: &LocalCa, out: &mut String) -> anyhow::Result<()> {
    let info = ca.info();
    writeln!(out, "  subject:     {}", info.subject)?;
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    writeln!(out, "  not before:  {}", info.not_before.format(rfc3339)?)?;
    writeln!(out, "  not after:   {}", info.not_after.format(rfc3339)?)?;
    writeln!(out, "  sha256:      {}", info.sha256_fingerprint)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_commands_parse_from_the_command_line() {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from([
            "chaperone",
            "ca",
            "export",
            "--dir",
            "/tmp/ca",
            "--cluster-ca",
            "/tmp/cluster.pem",
        ])
        .unwrap();
        let crate::cli::Command::Ca(CaCommand::Export { dir, cluster_ca }) = cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(dir, Path::new("/tmp/ca"));
        assert_eq!(cluster_ca.as_deref(), Some(Path::new("/tmp/cluster.pem")));
        let cli = crate::cli::Cli::try_parse_from(["chaperone", "ca", "show"]).unwrap();
        assert!(
            matches!(cli.command, crate::cli::Command::Ca(CaCommand::Show { ref dir }) if dir == Path::new(DEFAULT_CA_DIR))
        );
    }

    #[test]
    fn init_creates_once_then_keeps_the_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let mut first = String::new();
        init(&dir, &mut first).unwrap();
        assert!(first.starts_with("chaperone CA created:"), "{first}");
        assert!(
            first.contains(&dir.join("ca.crt").display().to_string()),
            "{first}"
        );
        let mut second = String::new();
        init(&dir, &mut second).unwrap();
        assert!(
            second.starts_with("chaperone CA already present, kept:"),
            "{second}"
        );
        // Same fingerprint both times.
        let fp = |s: &str| {
            s.lines()
                .find(|l| l.contains("sha256"))
                .unwrap()
                .to_string()
        };
        assert_eq!(fp(&first), fp(&second));
    }

    #[test]
    fn show_prints_subject_validity_and_fingerprint_and_never_creates() {
        let tmp = tempfile::tempdir().unwrap();
        let err = show(tmp.path(), &mut String::new()).unwrap_err();
        assert!(err.to_string().contains("chaperone ca init"), "{err}");
        assert!(!tmp.path().join("ca.key").exists());

        let ca = LocalCa::load_or_create(tmp.path()).unwrap();
        let mut out = String::new();
        show(tmp.path(), &mut out).unwrap();
        assert!(out.contains("CN=chaperone local CA"), "{out}");
        assert!(out.contains("not after"), "{out}");
        assert!(out.contains(&ca.info().sha256_fingerprint), "{out}");
    }

    #[test]
    fn export_prints_the_cluster_ca_then_chaperones() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(&tmp.path().join("ca")).unwrap();
        let cluster = LocalCa::load_or_create(&tmp.path().join("cluster")).unwrap();
        let cluster_file = tmp.path().join("cluster.pem");
        fs::write(&cluster_file, cluster.bundle_pem()).unwrap();

        let mut out = String::new();
        export(&tmp.path().join("ca"), Some(&cluster_file), &mut out).unwrap();
        let certs = parse_certificates("bundle", out.as_bytes()).unwrap();
        assert_eq!(
            certs,
            [
                cluster.certificate_der().clone(),
                ca.certificate_der().clone()
            ]
        );

        let garbage = tmp.path().join("garbage.pem");
        fs::write(&garbage, "hello").unwrap();
        let err = export(&tmp.path().join("ca"), Some(&garbage), &mut String::new()).unwrap_err();
        assert!(err.to_string().contains("garbage.pem"), "{err}");
    }
}
