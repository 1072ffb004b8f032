//! Argument parsing in two layers: raw flags (clap), then a validated `VmConfig`, merged with a
//! config file when one is given. Errors print as one line on stderr with a distinct exit code.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use vmm::config::{Backend, MemorySize, OnReboot, VmConfig};
use vmm::{Outcome, ResetCause, EXIT_USAGE};

#[derive(Parser)]
#[command(name = "ferrovisor", version, about = "Run virtual machines on KVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel (or restore a snapshot) in a new VM with its serial console on this
    /// terminal (Ctrl-A x quits).
    Run(Box<RunArgs>),
    /// Talk to a running VMM's control API (`run --api-sock PATH`).
    Ctl(api::CtlArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Kernel to boot: a bzImage, or an ELF vmlinux (entered through PVH if it has the note).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk to load for the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 panic=1"].
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Guest memory, e.g. 512M or 2G (a bare number is MiB) [default: 256M].
    #[arg(long, value_name = "SIZE")]
    memory: Option<MemorySize>,
    /// What a guest reboot does: exit (with code 3) or restart the guest [default: exit].
    #[arg(long, value_name = "ACTION")]
    on_reboot: Option<OnReboot>,
    /// vCPU back end: kvm (hardware-assisted), emu (Ferrovisor's emulator), or auto (kvm where
    /// the host has hardware virtualization, emu otherwise) [default: auto].
    #[arg(long, value_name = "BACKEND")]
    backend: Option<Backend>,
    /// Emulator only: guest time follows the instruction count, so the same guest with the same
    /// input produces the same output on every run.
    #[arg(long)]
    deterministic: bool,
    /// Add a virtio-blk disk: path=IMAGE[,ro=on][,serial=S] (a raw image file; repeat for
    /// more disks: /dev/vda, /dev/vdb, ...). Disks given here come after a config file's.
    #[arg(long, value_name = "DISK")]
    disk: Vec<vmm::config::DiskConfig>,
    /// Add a virtio-net interface on a tap: tap=NAME[,mac=52:54:00:12:34:56] (the tap is
    /// opened, or created if the VMM may; repeat for more interfaces: eth0, eth1, ...).
    #[arg(long, value_name = "NET")]
    net: Vec<vmm::config::NetConfig>,
    /// Add a virtio-rng device (the guest's /dev/hwrng), fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// Add a virtio-vsock device: cid=N,uds=PATH (the guest's CID, 3 or more; host programs
    /// connect to the unix socket PATH and send "CONNECT <port>\n", guest connections to host
    /// port P go to the socket PATH_P).
    #[arg(long, value_name = "VSOCK")]
    vsock: Option<vmm::config::VsockConfig>,
    /// Add a virtio-balloon device: [size=SIZE][,deflate_on_oom=on][,control=PATH] (size: the
    /// memory the guest gives back from boot on, 0 by default; control: a unix socket taking
    /// "set SIZE" and "stats" lines while the guest runs).
    #[arg(long, value_name = "BALLOON")]
    balloon: Option<vmm::config::BalloonConfig>,
    /// Read settings from a TOML or JSON file; flags given as well override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve the control API (HTTP/1.1 + JSON, docs/api.md) on this unix socket. With no
    /// kernel, config or snapshot given, the VMM waits there to be configured.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Resume the VM saved in this snapshot directory instead of booting. --disk, --net and
    /// --vsock then replace the snapshot's devices of that kind (same number of each), so
    /// clones of one snapshot get their own.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "cpus", "memory", "config", "rng", "balloon", "deterministic"])]
    restore: Option<PathBuf>,
    /// Queue this file's bytes on the serial console before the guest runs, as if typed at
    /// once (with --deterministic, or a deterministic snapshot, the same input then gives the
    /// same output on every run).
    #[arg(long, value_name = "FILE")]
    console_input: Option<PathBuf>,
    /// With --restore: leave the restored VM paused (resume it through the API).
    #[arg(long, requires = "restore")]
    paused: bool,
    /// With --restore: move the guest clock forward by the time since the snapshot was taken
    /// (otherwise the guest continues at the saved time).
    #[arg(long, requires = "restore")]
    refresh_clock: bool,
}

/// A user error with the message to print.
struct UsageError(String);

fn load_config_file(path: &Path) -> Result<VmConfig, UsageError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("cannot read the config file {path:?}: {e}")))?;
    let is_json =
        path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    let parsed = if is_json {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        toml::from_str(&text).map_err(|e| e.message().to_string())
    };
    parsed.map_err(|e| UsageError(format!("invalid config file {path:?}: {e}")))
}

impl RunArgs {
    /// What to start: a VM to boot, a snapshot to restore, or an API socket to wait on.
    fn into_launch(self) -> Result<vmm::controller::Launch, UsageError> {
        let api_sock = self.api_sock.clone();
        let console_input = self
            .console_input
            .as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| {
                    UsageError(format!("cannot read the console input file {p:?}: {e}"))
                })
            })
            .transpose()?;
        if let Some(dir) = self.restore.clone() {
            let overrides = vmm::controller::Overrides {
                disks: (!self.disk.is_empty()).then_some(self.disk),
                nets: (!self.net.is_empty()).then_some(self.net),
                vsock: self.vsock,
            };
            return Ok(vmm::controller::Launch {
                config: None,
                restore: Some(vmm::controller::RestoreRequest {
                    dir,
                    resume: !self.paused,
                    refresh_clock: self.refresh_clock,
                    backend: self.backend,
                    overrides,
                }),
                api_sock,
                console_input,
            });
        }
        if api_sock.is_some() && self.kernel.is_none() && self.config.is_none() {
            return Ok(vmm::controller::Launch {
                api_sock,
                console_input,
                ..Default::default()
            });
        }
        Ok(vmm::controller::Launch {
            config: Some(self.into_config()?),
            restore: None,
            api_sock,
            console_input,
        })
    }

    fn into_config(self) -> Result<VmConfig, UsageError> {
        let mut config = match (&self.config, &self.kernel) {
            (Some(path), _) => {
                let mut c = load_config_file(path)?;
                // Relative paths in a config file are relative to the file.
                let base = path.parent().unwrap_or(Path::new("."));
                c.kernel = base.join(&c.kernel);
                c.initrd = c.initrd.map(|p| base.join(p));
                for d in &mut c.disks {
                    d.path = base.join(&d.path);
                }
                if let Some(v) = &mut c.vsock {
                    v.uds = base.join(&v.uds);
                }
                if let Some(p) = c.balloon.as_mut().and_then(|b| b.control.as_mut()) {
                    *p = base.join(&*p);
                }
                c
            }
            (None, Some(kernel)) => VmConfig::new(kernel.clone()),
            (None, None) => {
                return Err(UsageError(
                    "no kernel given; pass --kernel PATH, --config FILE, --restore DIR or --api-sock PATH".into(),
                ))
            }
        };
        if let Some(k) = self.kernel {
            config.kernel = k;
        }
        if let Some(i) = self.initrd {
            config.initrd = Some(i);
        }
        if let Some(c) = self.cmdline {
            config.cmdline = c;
        }
        if let Some(n) = self.cpus {
            config.cpus = n;
        }
        if let Some(m) = self.memory {
            config.memory = m;
        }
        if let Some(r) = self.on_reboot {
            config.on_reboot = r;
        }
        if let Some(b) = self.backend {
            config.backend = b;
        }
        if self.deterministic {
            config.deterministic = true;
        }
        config.disks.extend(self.disk);
        if self.rng {
            config.rng = true;
        }
        if let Some(v) = self.vsock {
            config.vsock = Some(v);
        }
        if let Some(b) = self.balloon {
            config.balloon = Some(b);
        }
        config.nets.extend(self.net);
        Ok(config)
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        1 => "SIGHUP".into(),
        2 => "SIGINT".into(),
        15 => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

fn report(outcome: &Outcome) {
    match outcome {
        Outcome::PowerOff => {}
        Outcome::Reset(cause) => {
            let how = match cause {
                ResetCause::Device => "reset request",
                ResetCause::TripleFault => "triple fault",
                ResetCause::Hypervisor => "hypervisor reset event",
            };
            eprintln!(
                "ferrovisor: the guest rebooted ({how}); use --on-reboot restart to restart it"
            );
        }
        Outcome::VcpuFailed { id, reason, state } => {
            eprintln!("ferrovisor: vCPU {id} failed: {reason}");
            for line in state.lines() {
                eprintln!("ferrovisor:   {line}");
            }
        }
        Outcome::Signal(sig) => eprintln!("ferrovisor: stopped by {}", signal_name(*sig)),
        Outcome::ConsoleQuit => eprintln!("ferrovisor: quit from the console (Ctrl-A x)"),
        Outcome::Killed => eprintln!("ferrovisor: the VM was killed through the control API"),
        Outcome::Api(_) => {}
    }
}

/// Warnings (an unimplemented instruction, a misbehaving guest) go to stderr; FERROVISOR_LOG
/// takes a tracing filter (e.g. `debug`, `emu=trace`) for more.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERROVISOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

pub fn main() -> i32 {
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match cli.command {
        Command::Ctl(args) => api::ctl_main(args),
        Command::Run(args) => {
            let launch = match (*args).into_launch() {
                Ok(l) => l,
                Err(UsageError(msg)) => {
                    eprintln!("ferrovisor: {msg}");
                    return EXIT_USAGE;
                }
            };
            match vmm::controller::launch(launch) {
                Ok(outcome) => {
                    report(&outcome);
                    outcome.exit_code()
                }
                Err(e) => {
                    let mut line = vmm::error_line(&e);
                    if let Some(hint) = e.hint() {
                        line.push_str("; ");
                        line.push_str(hint);
                    }
                    eprintln!("ferrovisor: {line}");
                    e.exit_code()
                }
            }
        }
    }
}
