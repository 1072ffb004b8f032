//! The VMM's main thread: builds the VM (booting it or restoring a snapshot), then waits for
//! events — the guest powering off, a signal, a control API request — and acts on them:
//! start, pause, resume, snapshot, kill.
//!
//! API requests are served here, between events, so a request never races the VM's own
//! transitions: one thread owns the VM.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::{
    ApiCall, ApiError, ApiRequest, ApiResponse, PingResponse, RestoreConfig, VmBackend, VmInfo,
    VmState,
};
use hypervisor::{BackendKind, Hypervisor};
use serde::Deserialize;

use crate::config::{self, ConfigError, DiskConfig, NetConfig, OnReboot, VmConfig, VsockConfig};
use crate::console;
use crate::snapshot;
use crate::vm::{self, RunState, Start, Vm};
use crate::{choose_backend, Outcome, VmEvent, VmmError};

/// How long a graceful shutdown waits for the guest to power off when the request names no
/// timeout.
pub const DEFAULT_SHUTDOWN_TIMEOUT_S: u64 = 30;

/// What this VMM process is asked to do when it starts.
#[derive(Debug, Default)]
pub struct Launch {
    /// Boot this VM at once.
    pub config: Option<VmConfig>,
    /// Restore this snapshot at once (instead of `config`).
    pub restore: Option<RestoreRequest>,
    /// Serve the control API on this unix socket. Without `config` or `restore`, the VMM
    /// waits there to be configured.
    pub api_sock: Option<PathBuf>,
    /// Bytes queued on the serial console before the guest runs, as if typed at once. The
    /// guest takes them when it reads the UART, so in deterministic mode the same input gives
    /// the same output on every run (input typed while the guest runs arrives whenever the
    /// host delivers it).
    pub console_input: Option<Vec<u8>>,
}

/// A restore: which snapshot, and what to change about the machine it describes.
#[derive(Debug, Default)]
pub struct RestoreRequest {
    pub dir: PathBuf,
    /// Run the guest at once; otherwise it waits, paused, for `resume` (or `start`).
    pub resume: bool,
    /// Move the guest clock forward by the time that passed since the snapshot was taken.
    /// Without it the guest continues at the saved time (exact, but its clock lags).
    pub refresh_clock: bool,
    /// The back end the user asked for, if any: it must be the snapshot's (or auto).
    pub backend: Option<config::Backend>,
    pub overrides: Overrides,
}

/// Per-restore changes to the snapshot's devices, so that clones of one snapshot do not share
/// disks, taps, or vsock addresses. Each list given replaces the snapshot's list of that kind
/// and must have as many entries (a device keeps its place on the PCI bus).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    #[serde(default)]
    pub disks: Option<Vec<DiskConfig>>,
    #[serde(default)]
    pub nets: Option<Vec<NetConfig>>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
}

impl Overrides {
    /// `config` with the overrides in place.
    pub fn apply(&self, config: &mut VmConfig) -> Result<(), ConfigError> {
        fn replace<T: Clone>(
            what: &'static str,
            saved: &mut Vec<T>,
            given: &Option<Vec<T>>,
        ) -> Result<(), ConfigError> {
            if let Some(given) = given {
                if given.len() != saved.len() {
                    return Err(ConfigError::OverrideCount {
                        what,
                        saved: saved.len(),
                        given: given.len(),
                    });
                }
                saved.clone_from(given);
            }
            Ok(())
        }
        // The guest has seen each disk's serial: a clone's copy keeps it unless told otherwise.
        let serials: Vec<String> = config
            .disks
            .iter()
            .map(DiskConfig::effective_serial)
            .collect();
        replace("disk", &mut config.disks, &self.disks)?;
        for (disk, serial) in config.disks.iter_mut().zip(serials) {
            disk.serial.get_or_insert(serial);
        }
        replace("network interface", &mut config.nets, &self.nets)?;
        if let Some(v) = &self.vsock {
            if config.vsock.is_none() {
                return Err(ConfigError::OverrideCount {
                    what: "vsock device",
                    saved: 0,
                    given: 1,
                });
            }
            config.vsock = Some(v.clone());
        }
        Ok(())
    }
}

/// Runs the VMM as `launch` says until the VM ends (or, with only an API socket, until a
/// signal ends the waiting VMM).
pub fn launch(launch: Launch) -> Result<Outcome, VmmError> {
    if let Some(c) = &launch.config {
        c.validate(config::MAX_VCPUS, config::host_memory_bytes())?;
        vm::check_files(c)?;
    }
    // Read the snapshot before anything starts, so a bad one is reported first.
    let restore = launch
        .restore
        .map(|r| load_snapshot(&r.dir).map(|s| (r, s)))
        .transpose()?;
    crate::vcpu::install_kick_handler().map_err(VmmError::Signals)?;
    let (tx, rx): (Sender<VmEvent>, Receiver<VmEvent>) = mpsc::channel();
    crate::forward_termination_signals(tx.clone()).map_err(VmmError::Signals)?;
    let _server = launch
        .api_sock
        .as_ref()
        .map(|path| {
            api::Server::start(
                path,
                api::channel_handler(tx.clone(), |call| VmEvent::Api(Box::new(call)), || {}),
            )
        })
        .transpose()
        .map_err(VmmError::Api)?;

    let console_target: console::ConsoleTarget = Arc::new(Mutex::new(None));
    let raw_terminal = console::RawTerminal::enter();
    console::spawn_stdin_pump(console_target.clone(), tx.clone(), raw_terminal.is_some())
        .map_err(VmmError::SpawnThread)?;

    let mut c = Controller {
        hv: None,
        config: None,
        vm: None,
        events: tx,
        console: console_target,
        console_input: launch.console_input,
    };
    if let Some((request, snapshot)) = restore {
        c.restore(&request, snapshot)?;
    } else if let Some(config) = launch.config {
        c.config = Some(config);
        c.boot()?;
    }
    c.serve(&rx)
}

fn load_snapshot(dir: &std::path::Path) -> Result<snapshot::Snapshot, VmmError> {
    snapshot::read_state(dir).map_err(VmmError::Snapshot)
}

/// The VM and what it was made from.
struct Controller {
    hv: Option<Box<dyn Hypervisor>>,
    config: Option<VmConfig>,
    vm: Option<Vm>,
    events: Sender<VmEvent>,
    console: console::ConsoleTarget,
    /// Input for the first VM built (see [`Launch::console_input`]).
    console_input: Option<Vec<u8>>,
}

impl Controller {
    /// Queues the launch's console input for the VM just built, before its vCPUs run.
    fn queue_console_input(&mut self) {
        if let Some(bytes) = self.console_input.take() {
            if let Some((serial, input)) =
                &*self.console.lock().expect("console target lock poisoned")
            {
                input.send(&bytes);
                // Fill the receive FIFO (and raise its interrupt) now; the guest pulls the
                // rest in as it reads, at points of its own instruction stream.
                serial.lock().expect("serial lock poisoned").pull_input();
            }
        }
    }

    /// Boots the configured VM.
    fn boot(&mut self) -> Result<(), VmmError> {
        let config = self.config.clone().expect("boot needs a config");
        let hv: Box<dyn Hypervisor> = if config.deterministic {
            Box::new(emu::backend::EmuHypervisor::deterministic())
        } else {
            choose_backend(config.backend)?
        };
        config.validate(hv.max_vcpus(), config::host_memory_bytes())?;
        let mut vm = Vm::build(
            hv.as_ref(),
            &config,
            Start::Boot,
            self.events.clone(),
            &self.console,
        )?;
        self.queue_console_input();
        vm.start()?;
        self.hv = Some(hv);
        self.vm = Some(vm);
        Ok(())
    }

    /// Builds the VM a snapshot describes and puts its state back.
    fn restore(
        &mut self,
        request: &RestoreRequest,
        snapshot: snapshot::Snapshot,
    ) -> Result<(), VmmError> {
        let asked = match request.backend {
            Some(config::Backend::Kvm) => Some(BackendKind::Kvm),
            Some(config::Backend::Emu) => Some(BackendKind::Emu),
            Some(config::Backend::Auto) | None => None,
        };
        if let Some(asked) = asked.filter(|&a| a != snapshot.backend) {
            return Err(VmmError::Snapshot(snapshot::SnapshotError::Backend {
                expected: asked,
                found: snapshot.backend,
                found_lower: vm::backend_name(snapshot.backend),
            }));
        }
        let mut config = snapshot.config.clone();
        request.overrides.apply(&mut config)?;
        config.validate(config::MAX_VCPUS, config::host_memory_bytes())?;
        let hv: Box<dyn Hypervisor> = match snapshot.backend {
            BackendKind::Emu if config.deterministic => {
                Box::new(emu::backend::EmuHypervisor::deterministic())
            }
            BackendKind::Emu => Box::new(emu::backend::EmuHypervisor::new()),
            BackendKind::Kvm => choose_backend(config::Backend::Kvm)?,
        };
        let advance_clock_ns = if request.refresh_clock {
            hypervisor::host_wall_clock_ns().saturating_sub(snapshot.created_unix_ns)
        } else {
            0
        };
        let mut vm = Vm::build(
            hv.as_ref(),
            &config,
            Start::Restore {
                dir: &request.dir,
                snapshot: &snapshot,
                advance_clock_ns,
            },
            self.events.clone(),
            &self.console,
        )?;
        self.queue_console_input();
        if request.resume {
            vm.start()?;
        }
        self.hv = Some(hv);
        self.config = Some(config);
        self.vm = Some(vm);
        Ok(())
    }

    /// Waits for events and API requests until the VM ends.
    fn serve(&mut self, events: &Receiver<VmEvent>) -> Result<Outcome, VmmError> {
        loop {
            let event = events
                .recv()
                .expect("the controller holds a sender, so the channel stays open");
            match event {
                VmEvent::Api(call) => {
                    let ApiCall { request, reply } = *call;
                    if let (ApiRequest::Shutdown(cfg), Some(_)) = (&request, &self.vm) {
                        let timeout = Duration::from_secs(
                            cfg.timeout_s.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_S),
                        );
                        return Ok(self.shutdown(events, timeout, reply));
                    }
                    let (answer, end) = self.handle(request);
                    let _ = reply.send(answer);
                    if let Some(end) = end {
                        // Let the connection thread write the reply before the process ends.
                        std::thread::sleep(Duration::from_millis(50));
                        return Ok(end);
                    }
                }
                VmEvent::Reset(_)
                    if self.vm.is_some()
                        && self.config.as_ref().map(|c| c.on_reboot) == Some(OnReboot::Restart) =>
                {
                    self.vm = None;
                    // Events queued by other vCPUs of the stopped VM are stale, except a
                    // request to quit.
                    let mut quit = None;
                    while let Ok(stale) = events.try_recv() {
                        match stale {
                            VmEvent::Signal(_) | VmEvent::ConsoleQuit => quit = Some(stale),
                            VmEvent::Api(call) => {
                                let _ = call.reply.send(Err(ApiError::conflict(
                                    "the guest is rebooting; try again",
                                )));
                            }
                            _ => {}
                        }
                    }
                    if let Some(q) = quit {
                        return Ok(q);
                    }
                    self.boot()?;
                }
                // A failed or finished VM whose snapshot was restored paused has no running
                // vCPU to report anything; every other event ends this VMM.
                other => {
                    self.vm = None;
                    return Ok(other);
                }
            }
        }
    }

    /// Asks the guest to shut down (Ctrl-Alt-Del) and waits for it to power off, killing it
    /// after `timeout`. Other API requests meanwhile are refused; the reply goes out when the
    /// VM has ended either way.
    fn shutdown(
        &mut self,
        events: &Receiver<VmEvent>,
        timeout: Duration,
        reply: mpsc::Sender<Result<ApiResponse, ApiError>>,
    ) -> Outcome {
        let vm = self.vm_mut();
        // A paused guest cannot react: run it.
        if let Err(e) = vm.start() {
            tracing::warn!("cannot resume the VM to shut it down: {e}");
        }
        if let Err(e) = vm.request_shutdown() {
            // The guest's keyboard driver is not up (yet): only the timeout is left.
            tracing::warn!("the shutdown request did not reach the guest: {e}");
        }
        let deadline = Instant::now() + timeout;
        let outcome = loop {
            match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(VmEvent::Api(call)) => {
                    let _ = call.reply.send(Err(ApiError::conflict(
                        "the VM is shutting down; wait for it to end",
                    )));
                }
                // A reset: the guest answered Ctrl-Alt-Del before its init took it over (the
                // kernel then reboots at once). Either way the guest is done.
                Ok(VmEvent::Reset(_)) | Ok(VmEvent::PowerOff) => break VmEvent::PowerOff,
                Ok(other) => break other,
                Err(_) => {
                    eprintln!(
                        "ferrovisor: the guest did not power off within {}s of the shutdown request; killed",
                        timeout.as_secs()
                    );
                    break VmEvent::Killed;
                }
            }
        };
        self.vm = None;
        let _ = reply.send(Ok(ApiResponse::NoContent));
        // Let the connection thread write the reply before the process ends.
        std::thread::sleep(Duration::from_millis(50));
        outcome
    }

    fn state(&self) -> VmState {
        match (&self.vm, &self.config) {
            (Some(vm), _) => match vm.state() {
                RunState::Running => VmState::Running,
                RunState::Paused => VmState::Paused,
                // Restored, waiting for resume: as good as paused (a snapshot can be taken).
                RunState::Created => VmState::Paused,
            },
            (None, Some(_)) => VmState::Configured,
            (None, None) => VmState::NotConfigured,
        }
    }

    /// Answers one API request; `Some` outcome when it ends the VM.
    fn handle(&mut self, request: ApiRequest) -> (Result<ApiResponse, ApiError>, Option<Outcome>) {
        let state = self.state();
        if !request.allowed_in(state) {
            return (Err(ApiError::not_allowed_in(&request, state)), None);
        }
        let done = |r: Result<(), VmmError>| {
            r.map(|()| ApiResponse::NoContent)
                .map_err(|e| vmm_error_to_api(&e))
        };
        match request {
            ApiRequest::Ping => (Ok(ApiResponse::Ping(PingResponse::current())), None),
            ApiRequest::Info => (Ok(ApiResponse::Info(self.info(state))), None),
            ApiRequest::Configure(value) => (self.configure(value), None),
            ApiRequest::Start => {
                let r = match &mut self.vm {
                    Some(vm) => vm.start(),
                    None => self.boot(),
                };
                (done(r), None)
            }
            ApiRequest::Pause => (done(self.vm_mut().pause()), None),
            ApiRequest::Resume => (done(self.vm_mut().start()), None),
            ApiRequest::Snapshot(s) => {
                let dir = PathBuf::from(&s.dir);
                (done(self.vm_mut().snapshot(&dir, s.diff)), None)
            }
            ApiRequest::Restore(r) => (self.restore_from_api(r), None),
            ApiRequest::Kill => {
                self.vm = None;
                (Ok(ApiResponse::NoContent), Some(Outcome::Killed))
            }
            // With a VM, `serve` handles it (it waits for the VM to end); without one it is
            // refused by `allowed_in` above.
            ApiRequest::Shutdown(_) => {
                (Err(ApiError::conflict("there is no VM to shut down")), None)
            }
        }
    }

    fn vm_mut(&mut self) -> &mut Vm {
        self.vm
            .as_mut()
            .expect("requests that need a VM are only allowed when there is one")
    }

    fn info(&self, state: VmState) -> VmInfo {
        let backend = self.vm.as_ref().map(|vm| match vm.backend() {
            BackendKind::Kvm => VmBackend::Kvm,
            BackendKind::Emu => VmBackend::Emu,
        });
        VmInfo {
            state,
            backend,
            config: self
                .config
                .as_ref()
                .and_then(|c| serde_json::to_value(c).ok()),
        }
    }

    fn configure(&mut self, value: serde_json::Value) -> Result<ApiResponse, ApiError> {
        let config: VmConfig = serde_json::from_value(value)
            .map_err(|e| ApiError::bad_request(format!("invalid VM config: {e}")))?;
        config
            .validate(config::MAX_VCPUS, config::host_memory_bytes())
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        vm::check_files(&config).map_err(|e| vmm_error_to_api(&e))?;
        self.config = Some(config);
        Ok(ApiResponse::NoContent)
    }

    fn restore_from_api(&mut self, r: RestoreConfig) -> Result<ApiResponse, ApiError> {
        let overrides = match r.overrides {
            Some(v) => serde_json::from_value(v)
                .map_err(|e| ApiError::bad_request(format!("invalid overrides: {e}")))?,
            None => Overrides::default(),
        };
        let request = RestoreRequest {
            dir: PathBuf::from(r.dir),
            resume: r.resume,
            refresh_clock: false,
            backend: None,
            overrides,
        };
        let snapshot = load_snapshot(&request.dir).map_err(|e| vmm_error_to_api(&e))?;
        self.restore(&request, snapshot)
            .map(|()| ApiResponse::NoContent)
            .map_err(|e| vmm_error_to_api(&e))
    }
}

/// A VMM error as the API reports it: the user's mistakes are 400, the rest 500.
fn vmm_error_to_api(e: &VmmError) -> ApiError {
    let mut line = crate::error_line(e);
    if let Some(hint) = e.hint() {
        line.push_str("; ");
        line.push_str(hint);
    }
    if e.is_usage_error() {
        ApiError::bad_request(line)
    } else {
        ApiError::internal(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        let mut c = VmConfig::new("/k".into());
        c.disks = vec!["path=/a".parse().unwrap(), "path=/b".parse().unwrap()];
        c.vsock = Some("cid=3,uds=/tmp/v".parse().unwrap());
        c
    }

    #[test]
    fn overrides_replace_device_lists_of_the_same_length() {
        let mut c = config();
        let o: Overrides = serde_json::from_value(serde_json::json!({
            "disks": [{"path": "/c"}, {"path": "/d", "read_only": true}],
            "vsock": {"cid": 7, "uds": "/tmp/w"}
        }))
        .unwrap();
        o.apply(&mut c).unwrap();
        assert_eq!(c.disks[0].path, PathBuf::from("/c"));
        assert!(c.disks[1].read_only);
        assert_eq!(c.vsock.as_ref().unwrap().cid, 7);
    }

    #[test]
    fn overrides_that_change_the_machine_are_refused() {
        let mut c = config();
        let o = Overrides {
            disks: Some(vec!["path=/c".parse().unwrap()]),
            ..Default::default()
        };
        let err = o.apply(&mut c).unwrap_err().to_string();
        assert!(err.contains("2 disk"), "{err}");
        let mut c = config();
        let o = Overrides {
            disks: Some(vec![
                "path=/copy/a".parse().unwrap(),
                "path=/copy/b,serial=mine".parse().unwrap(),
            ]),
            ..Default::default()
        };
        o.apply(&mut c).unwrap();
        assert_eq!(
            c.disks[0].serial.as_deref(),
            Some("a"),
            "a copy keeps the serial"
        );
        assert_eq!(c.disks[1].serial.as_deref(), Some("mine"));
        let mut c = VmConfig::new("/k".into());
        let o = Overrides {
            vsock: Some("cid=3,uds=/tmp/v".parse().unwrap()),
            ..Default::default()
        };
        assert!(o.apply(&mut c).is_err());
        assert!(serde_json::from_value::<Overrides>(serde_json::json!({"cpus": 2})).is_err());
    }
}
