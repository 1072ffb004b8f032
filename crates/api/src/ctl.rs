//! `ferrovisor ctl`: drive a running VMM through its API socket from the command line.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::client::{Client, ClientError};
use crate::types::RestoreConfig;

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: the VMM failed, or could not be reached.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: bad arguments or input, or a request the server rejected as malformed (4xx).
pub const EXIT_USAGE: i32 = 2;
/// Exit code: the request is not allowed in the VM's current state (409).
pub const EXIT_REFUSED: i32 = 3;

/// Arguments of `ferrovisor ctl`.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// The VMM's API socket: the path it was started with as --api-sock.
    #[arg(long, value_name = "PATH")]
    pub sock: PathBuf,
    /// What to ask the VMM.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The requests `ferrovisor ctl` can send.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CtlCommand {
    /// Print the VM's state, back end and config as JSON.
    Info,
    /// Print the VMM's version and pid as JSON.
    Ping,
    /// Define the VM from a JSON config FILE ("-" reads standard input); before start only.
    Config {
        /// The VM config, as JSON; paths in it are read by the VMM, so make them absolute.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Boot the configured VM.
    Start,
    /// Stop the VM's vCPUs.
    Pause,
    /// Restart a paused VM's vCPUs.
    Resume,
    /// Type Ctrl-Alt-Del on the guest keyboard; kill the VM if it has not powered off after the timeout.
    Shutdown {
        /// Seconds to wait for the guest to power off [default: the VMM's].
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
    },
    /// Stop the VM at once.
    Kill,
    /// Save the paused VM into DIR.
    Snapshot {
        /// Directory to write the snapshot into.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Save only the memory written since the last snapshot.
        #[arg(long)]
        diff: bool,
    },
    /// Load the snapshot in DIR into a VMM that has not started a VM.
    Restore {
        /// Directory holding the snapshot.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Run the VM once restored (otherwise it stays paused).
        #[arg(long)]
        resume: bool,
        /// JSON file of settings to change on the way in.
        #[arg(long, value_name = "FILE")]
        overrides: Option<PathBuf>,
    },
}

/// A failure with its exit code and the one line to print.
#[derive(Debug)]
struct CtlFailure {
    code: i32,
    message: String,
}

fn usage(message: String) -> CtlFailure {
    CtlFailure {
        code: EXIT_USAGE,
        message,
    }
}

impl From<ClientError> for CtlFailure {
    fn from(e: ClientError) -> Self {
        let code = match e.status() {
            Some(409) => EXIT_REFUSED,
            Some(400..=499) => EXIT_USAGE,
            _ => EXIT_FAILED,
        };
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        CtlFailure { code, message }
    }
}

/// Runs `ferrovisor ctl`: sends the request, prints a JSON result (if the request has one) on
/// stdout, or one line `ferrovisor ctl: <message>` on stderr. Returns the exit code: 0 done,
/// 1 failed or the VMM unreachable, 2 bad input or a request the VMM rejected, 3 not allowed in
/// the VM's current state.
pub fn ctl_main(args: CtlArgs) -> i32 {
    let mut stdout = io::stdout().lock();
    match run(&args, &mut stdout) {
        Ok(()) => EXIT_OK,
        Err(f) => {
            eprintln!("ferrovisor ctl: {}", f.message);
            f.code
        }
    }
}

fn run(args: &CtlArgs, out: &mut impl Write) -> Result<(), CtlFailure> {
    let client = Client::new(&args.sock);
    let result: Option<String> = match &args.command {
        CtlCommand::Info => Some(pretty(&client.info()?)),
        CtlCommand::Ping => Some(pretty(&client.ping()?)),
        CtlCommand::Config { file } => {
            let config = read_json(file)?;
            if !config.is_object() {
                return Err(usage(format!(
                    "{} holds JSON that is not an object: the VM config is an object such as {{\"kernel\": \"/path/to/vmlinux\"}}",
                    file.display()
                )));
            }
            client.configure(&config)?;
            None
        }
        CtlCommand::Start => client.start().map(|()| None)?,
        CtlCommand::Pause => client.pause().map(|()| None)?,
        CtlCommand::Resume => client.resume().map(|()| None)?,
        CtlCommand::Shutdown { timeout } => client.shutdown(*timeout).map(|()| None)?,
        CtlCommand::Kill => client.kill().map(|()| None)?,
        CtlCommand::Snapshot { dir, diff } => {
            client.snapshot(&absolute(dir)?, *diff)?;
            None
        }
        CtlCommand::Restore {
            dir,
            resume,
            overrides,
        } => {
            let overrides = overrides.as_deref().map(read_json).transpose()?;
            client.restore(&RestoreConfig {
                dir: absolute(dir)?,
                resume: *resume,
                overrides,
            })?;
            None
        }
    };
    if let Some(text) = result {
        writeln!(out, "{text}").map_err(|e| CtlFailure {
            code: EXIT_FAILED,
            message: format!("cannot write the result: {e}"),
        })?;
    }
    Ok(())
}

/// Pretty JSON, fields in the order the type declares them.
fn pretty(value: &impl serde::Serialize) -> String {
    // The API types are plain data with string keys: encoding them cannot fail.
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// The path made absolute against our working directory, as text: the VMM has its own.
fn absolute(path: &Path) -> Result<String, CtlFailure> {
    let abs = std::path::absolute(path)
        .map_err(|e| usage(format!("cannot resolve {}: {e}", path.display())))?;
    abs.into_os_string().into_string().map_err(|p| {
        usage(format!(
            "{} is not valid UTF-8: rename it",
            PathBuf::from(p).display()
        ))
    })
}

/// Reads and parses a JSON file, or standard input for "-".
fn read_json(path: &Path) -> Result<Value, CtlFailure> {
    let text = if path == Path::new("-") {
        let mut s = String::new();
        io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| usage(format!("cannot read standard input: {e}")))?;
        s
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?
    };
    serde_json::from_str(&text)
        .map_err(|e| usage(format!("{} is not valid JSON: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_in_current_state_exits_3_and_bad_input_2() {
        let conflict = ClientError::Api {
            status: 409,
            message: "pause first".into(),
        };
        assert_eq!(CtlFailure::from(conflict).code, EXIT_REFUSED);
        let bad = ClientError::Api {
            status: 400,
            message: "x".into(),
        };
        assert_eq!(CtlFailure::from(bad).code, EXIT_USAGE);
        let gone = ClientError::Api {
            status: 503,
            message: "x".into(),
        };
        assert_eq!(CtlFailure::from(gone).code, EXIT_FAILED);
    }

    #[test]
    fn connect_failure_message_carries_hint_and_cause() {
        let e = ClientError::Connect {
            path: "/run/vm.sock".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        let f = CtlFailure::from(e);
        assert_eq!(f.code, EXIT_FAILED);
        assert!(f.message.contains("--api-sock"), "{}", f.message);
        assert!(f.message.ends_with(": entity not found"), "{}", f.message);
    }

    #[test]
    fn relative_snapshot_dir_is_made_absolute() {
        let abs = absolute(Path::new("snap")).unwrap();
        assert!(Path::new(&abs).is_absolute(), "{abs}");
        assert!(abs.ends_with("/snap"), "{abs}");
    }
}
