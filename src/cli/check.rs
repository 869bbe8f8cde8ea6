//! `stepgate check`: findings per statement, as text or JSON; exit 0 clean, 1 findings, 2 errors.

use std::path::PathBuf;
use std::process::ExitCode;

use stepgate::config::{Config, Overrides};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum CheckFormat {
    Text,
    Json,
}

pub fn run(
    format: CheckFormat,
    config: Option<PathBuf>,
    database: &str,
    user: &str,
    files: &[String],
) -> anyhow::Result<ExitCode> {
    use std::io::Read;
    use stepgate::check::{check_text, read_source};
    let config = Config::load(config.as_deref(), &Overrides::default())?;
    let rule = config.rule_for(database, user);
    let classifier = stepgate::classify::Classifier::for_config(&config);
    let mut findings = Vec::new();
    // A file that cannot be read or decoded is an error for that file only: the others are still checked
    // and printed, and the exit status is 2.
    let mut failed = false;
    for file in files {
        let bytes = if file == "-" {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).map(|_| buf)
        } else {
            std::fs::read(file)
        };
        let text = match bytes {
            Err(e) => Err(format!("cannot read {file}: {e}")),
            Ok(b) => read_source(&b).map_err(|e| format!("{file}: {e}")),
        };
        match text {
            Ok(text) => findings.extend(check_text(file, &text, &config, &rule, &classifier)),
            Err(e) => {
                eprintln!("stepgate check: {e}");
                failed = true;
            }
        }
    }
    let code = if failed {
        ExitCode::from(2)
    } else if findings.iter().any(|f| f.guarded) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    };
    match print_findings(format, &findings) {
        // A closed pipe (`stepgate check … | head`) is not an error of ours.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(code),
        Err(e) => Err(e.into()),
        Ok(()) => Ok(code),
    }
}

fn print_findings(
    format: CheckFormat,
    findings: &[stepgate::check::Finding],
) -> std::io::Result<()> {
    use std::io::Write;
    use stepgate::check::first_line;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match format {
        CheckFormat::Json => {
            for f in findings {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(f).map_err(std::io::Error::other)?
                )?;
            }
        }
        CheckFormat::Text => {
            let loc: Vec<String> = findings
                .iter()
                .map(|f| format!("{}:{}", f.file, f.line))
                .collect();
            let w = loc.iter().map(|l| l.len()).max().unwrap_or(0).max(9);
            writeln!(
                out,
                "{:w$}  {:11}  {:7}  STATEMENT",
                "FILE:LINE", "CLASS", "GUARDED"
            )?;
            for (f, l) in findings.iter().zip(&loc) {
                let guarded = if f.guarded { "yes" } else { "no" };
                writeln!(
                    out,
                    "{l:w$}  {:11}  {guarded:7}  {}",
                    f.class.as_str(),
                    first_line(&f.sql, 80)
                )?;
            }
            let held = findings.iter().filter(|f| f.guarded).count();
            writeln!(out, "{} statements, {held} guarded", findings.len())?;
        }
    }
    out.flush()
}
